"""`jaxgpt explore`: the journey of a prompt as an interactive local web page.

`analysis.py` computes everything the page shows from one `forward(..., capture=True)` pass (the
functions of `jaxgpt.trace`); `server.py` serves it as JSON next to the static page in `static/`
(vanilla JavaScript and SVG/canvas: no build step, nothing fetched from the internet).
"""
