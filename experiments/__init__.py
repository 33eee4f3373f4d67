"""The bundled experiments: each module defines `EXPERIMENT = Experiment(...)` (see
`jaxgpt.experiment`); `jaxgpt train NAME` runs `NAME.py`. Installed as `jaxgpt.experiments`."""
