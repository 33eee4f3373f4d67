"""`jaxgpt explore`: the JSON API (analysis = the forward pass, "next token" extending the KV cache
of the page session, validation, the server survives bad requests), the chat tab's event stream
(= `Conversation` / `jaxgpt chat`), the CLI's one-line errors, and the page itself in headless
Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium; nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.chat import with_chat_tokens
from jaxgpt.cli import main
from jaxgpt.cli.common import LoadedModel
from jaxgpt.config import GPTConfig
from jaxgpt.conversation import Conversation
from jaxgpt.decode import generate
from jaxgpt.explore.analysis import MAX_SESSIONS, Explorer
from jaxgpt.explore.server import create_app
from jaxgpt.model import forward
from jaxgpt.params import init_params
from jaxgpt.tokenizer import get_tokenizer

SENTENCE = "Hola mundo. Esta es una prueba de tokenización real."


@pytest.fixture(scope="module")
def model():
    """A tiny random-weight model with GPT-2's vocabulary and tokenizer."""
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)
    params = init_params(config, jax.random.key(0))
    return LoadedModel(config, params, get_tokenizer("gpt2"), "tiny random GPT-2 (test)")


@pytest.fixture(scope="module")
def chat_model():
    """A tiny random-weight chat model: GPT-2's tokenizer with the chat tokens."""
    tokenizer = with_chat_tokens(get_tokenizer("gpt2"))
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_size=tokenizer.n_vocab)
    params = init_params(config, jax.random.key(1))
    return LoadedModel(config, params, tokenizer, "tiny random chat model (test)")


def serve(model: LoadedModel):
    """The app on a free port of 127.0.0.1, served from a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = create_app(Explorer(model))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def server(model):
    yield from serve(model)


@pytest.fixture(scope="module")
def chat_server(chat_model):
    yield from serve(chat_model)


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --------------------------------------------------------------------------- the API


def test_analysis_is_the_forward_pass(server, model):
    status, data = post(f"{server}/api/analyze", {"text": SENTENCE})
    assert status == 200, data
    ids = get_tokenizer("gpt2").encode(SENTENCE)
    assert data["ids"] == ids and len(ids) == 20
    assert data["tokens"][-3]["bytes"] == "ón".encode().hex(" ") == "c3 b3 6e"
    logits, cap = forward(model.params, jnp.asarray([ids]), model.config, capture=True)
    att = np.asarray(cap["layers"][1]["att"][0, 1])
    for i, row in enumerate(data["attention"][1][1]):
        np.testing.assert_allclose(row, att[i, : i + 1], atol=2e-5)
    x_out = np.asarray(cap["layers"][-1]["x_out"][0])
    np.testing.assert_allclose(data["norms"][-1], np.linalg.norm(x_out, axis=-1), atol=2e-6)
    best = int(np.argmax(np.asarray(logits[0, -1])))
    assert data["candidates"][0]["id"] == best
    assert [row["stage"] for row in data["lens"]] == ["embeddings", "block 0", "block 1"]


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("analyze", b'{"text": "\xff\xfe"}', "not UTF-8"),
        ("analyze", b"{not json", "not valid JSON"),
        ("analyze", b"[1, 2]", "JSON object"),
        ("analyze", {"text": ""}, "empty"),
        ("analyze", {"text": "\ud800"}, "not valid UTF-8"),
        ("analyze", {"text": "word " * 70}, "at most 64"),
        ("analyze", {"ids": [1, 50257]}, "[0, 50256]"),
        ("lens", {"ids": [1, 2], "position": 5}, "position must be"),
        ("head", {"ids": [1, 2], "layer": 2, "head": 0}, "layer must be an integer from 0 to 1"),
        ("next", {"ids": [1, 2], "temperature": -1}, "temperature must be between"),
        ("next", {"ids": [1, 2], "temperature": "hot"}, "temperature must be a number"),
        ("next", {"ids": [1, 2], "top_p": 1.5}, "top-p must be between"),
        ("next", {"ids": [1, 2], "top_k": 0}, "top_k"),
        ("next", {"ids": [1, 2], "top_k": 2.5}, "top-k must be a whole number"),
        ("next", {"ids": [1] * 64}, "limit"),
    ],
)
def test_bad_requests_get_one_message_and_the_server_keeps_serving(server, path, body, message):
    status, data = post(f"{server}/api/{path}", body)
    assert status == 400 and message in data["error"], data
    assert post(f"{server}/api/analyze", {"ids": [1, 2, 3]})[0] == 200


def test_next_token_is_the_decoders(server, model):
    ids = get_tokenizer("gpt2").encode(SENTENCE)
    settings = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 3}
    status, data = post(f"{server}/api/next", {"ids": ids, **settings})
    assert status == 200, data
    expected = generate(model.params, model.config, ids, 1, key=jax.random.key(3),
                        temperature=0.9, top_k=50, top_p=0.95)  # fmt: skip
    assert data["token"] == expected[-1] and data["ids"] == expected


def test_next_token_extends_the_sessions_cache_and_equals_a_fresh_pass(server, model):
    ids = get_tokenizer("gpt2").encode(SENTENCE)
    status, data = post(f"{server}/api/analyze", {"ids": ids, "session": "kv"})
    assert status == 200 and data["computed"] == "prefilled", data
    for _ in range(3):
        status, data = post(f"{server}/api/next", {"ids": data["ids"], "temperature": 0,
                                                   "session": "kv"})  # fmt: skip
        assert status == 200 and data["computed"] == "extended", data
    assert data["ids"] == generate(model.params, model.config, ids, 3, temperature=0)
    # Every number drawn after three cached steps is the fresh forward(capture=True)'s.
    logits, cap = forward(model.params, jnp.asarray([data["ids"]]), model.config, capture=True)
    for layer, per_head in enumerate(data["attention"]):
        for head, rows in enumerate(per_head):
            att = np.asarray(cap["layers"][layer]["att"][0, head])
            for i, row in enumerate(rows):
                np.testing.assert_allclose(row, att[i, : i + 1], atol=2e-5)
    stages = [cap["x_embed"][0]] + [lay["x_out"][0] for lay in cap["layers"]]
    np.testing.assert_allclose(data["norms"], np.linalg.norm(stages, axis=-1), atol=2e-5)
    np.testing.assert_allclose(data["embeddings"], cap["x_embed"][0], atol=6e-5)
    last = np.asarray(logits[0, -1])
    top = [c["id"] for c in data["candidates"][:5]]
    assert top == np.argsort(-last, kind="stable")[:5].tolist()
    np.testing.assert_allclose([c["logit"] for c in data["candidates"]], last[top + [
        c["id"] for c in data["candidates"][5:]]], atol=1e-4)  # fmt: skip
    status, head = post(f"{server}/api/head", {"ids": data["ids"], "layer": 1, "head": 0,
                                               "session": "kv"})  # fmt: skip
    np.testing.assert_allclose(head["out"], cap["layers"][1]["heads"][0, 0], atol=2e-5)
    np.testing.assert_allclose(head["v"], cap["layers"][1]["v"][0, 0], atol=2e-5)
    # The same sequence again reads the session's captures; another session computes afresh.
    status, again = post(f"{server}/api/analyze", {"ids": data["ids"], "session": "kv"})
    assert again["computed"] == "reused" and again["attention"] == data["attention"]
    status, fresh = post(f"{server}/api/analyze", {"ids": data["ids"], "session": "other"})
    assert fresh["computed"] == "prefilled"
    np.testing.assert_allclose(fresh["norms"], data["norms"], atol=2e-5)


def test_sessions_are_bounded(model):
    explorer = Explorer(model)
    for n in range(MAX_SESSIONS + 2):
        explorer.capture([1, 2, 3], f"s{n}")
    assert list(explorer._sessions) == [f"s{n}" for n in range(2, MAX_SESSIONS + 2)]


# --------------------------------------------------------------------------- the chat tab


def chat_stream(url: str, body: dict) -> tuple[int, str, list[tuple[str, dict]]]:
    """POST to the chat endpoint: (status, content type, [(event type, data)])."""
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            kind = response.headers["Content-Type"]
            status = response.status
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], [("error", json.loads(err.read()))]
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return status, kind, events


def test_chat_streams_the_conversations_reply_and_reuses_its_cache(chat_server, chat_model):
    m = chat_model
    reference = Conversation(m.params, m.config, m.tokenizer, temperature=0.0, max_new_tokens=12)
    body = {"session": "c1", "temperature": 0, "max_new_tokens": 12}
    for turn, message in enumerate(["What is 2 + 3?", "And 4 + 4?"], 1):
        status, kind, events = chat_stream(f"{chat_server}/api/chat", {**body, "message": message})
        assert status == 200 and kind.startswith("text/event-stream"), events
        expected = list(reference.reply(message))
        pieces = [data["piece"] for kind, data in events if kind == "message"]
        assert len(pieces) > 1 and pieces == expected  # streamed piece by piece, as Conversation
        (last_kind, done), *_ = events[-1:]
        assert last_kind == "done" and done["done"] == "".join(expected)
        stats = reference.turn_stats[-1]
        assert done["stats"]["turn"] == turn and done["stats"]["prefilled"] == stats.prefilled
    assert done["stats"]["prefilled"] < done["stats"]["without_reuse"]  # turn 2 reused the cache
    assert post(f"{chat_server}/api/chat/reset", {"session": "c1"})[1] == {"reset": True}
    _, _, events = chat_stream(f"{chat_server}/api/chat", {**body, "message": "And 4 + 4?"})
    assert events[-1][1]["stats"]["turn"] == 1


def test_a_page_that_goes_away_mid_reply_frees_its_session(chat_server):
    import http.client

    host, port = chat_server.removeprefix("http://").split(":")
    body = {"session": "gone", "message": "Tell me a long story.", "max_new_tokens": 1024}
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/api/chat", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read1(64).startswith(b"data: ")  # it streams
    conn.sock.close()  # the browser tab closes mid-reply (1,024 tokens at most: far from done)
    conn.close()
    # The dropped stream must not leave the session "still streaming" for ever.
    deadline = time.time() + 30
    while True:
        status, _, events = chat_stream(f"{chat_server}/api/chat", {
            "session": "gone", "message": "Still there?", "max_new_tokens": 2})  # fmt: skip
        if status == 200 or time.time() > deadline:
            break
        assert "still streaming" in events[0][1]["error"], events
        time.sleep(0.2)
    assert status == 200 and events[-1][0] == "done", events


@pytest.mark.parametrize(
    "body, message",
    [
        ({"message": ""}, "empty"),
        ({"message": "hi", "temperature": -1}, "temperature must be between"),
        ({"message": "hi", "top_k": 0}, "top_k"),
        ({"message": "hi", "max_new_tokens": 0}, "max new tokens"),
        ({"message": "hi", "session": "a b"}, "session must be"),
        ({"message": "hello " * 80}, "too long"),
    ],
)
def test_bad_chat_requests_get_one_message(chat_server, body, message):
    status, _, events = chat_stream(f"{chat_server}/api/chat", {"session": "bad", **body})
    assert status == 400 and message in events[0][1]["error"], events
    status, _, events = chat_stream(f"{chat_server}/api/chat", {"session": "bad", "message": "hi",
                                                                "max_new_tokens": 2})  # fmt: skip
    assert status == 200 and events[-1][0] == "done"


def test_a_model_without_chat_tokens_has_no_chat(server):
    status, events = post(f"{server}/api/chat", {"message": "hi"})
    assert status == 400 and "not a chat model" in events["error"]
    info = json.loads(urllib.request.urlopen(f"{server}/api/model").read())
    assert info["chat"] is False and "no chat tokens" in info["chat_absent"]


# --------------------------------------------------------------------------- the CLI


def test_cli_port_in_use_and_unknown_model_exit_2(capsys, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        assert main(["explore", "--model", "mini", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxgpt explore: error: cannot listen on 127.0.0.1:")
        assert err.count("\n") == 1 and "--port" in err
    finally:
        busy.close()
    assert main(["explore", "--model", str(tmp_path / "nope"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("jaxgpt explore: error:") and "does not exist" in err


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (.ci/run "
                    "installs them: apt-get install -y chromium chromium-driver)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,2300"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


def wait_ready(driver, updates: int | None = None, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        state = driver.execute_script("return document.body.dataset.state")
        done = driver.execute_script("return window.explorer.updates")
        if state in ("ready", "error") and (updates is None or done >= updates):
            return
        time.sleep(0.05)
    raise AssertionError(f"the page did not finish (state {state!r}, {done} updates)")


def set_control(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input'));",
        element_id, str(value),
    )  # fmt: skip


def test_the_page_in_headless_chromium(server, browser, model):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.get(server + "/")
    wait_ready(driver)
    assert "2 layers, 2 heads" in driver.find_element(By.ID, "model").text
    # GPT-2's plain tokenizer has no chat tokens: the chat tab says so instead of chatting.
    driver.find_element(By.ID, "tab-chat").click()
    absent = driver.find_element(By.ID, "chat-absent")
    assert absent.is_displayed() and "not a chat model" in absent.text
    assert not driver.find_element(By.ID, "chat-box").is_displayed()
    driver.find_element(By.ID, "tab-journey").click()

    # 1. The prompt's tokens and ids, as tiktoken's GPT-2 encoding gives them.
    driver.find_element(By.ID, "prompt").send_keys(SENTENCE)
    driver.find_element(By.ID, "run").click()
    wait_ready(driver, updates=1)
    chips = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    ids = [int(chip.get_attribute("data-id")) for chip in chips]
    assert ids == get_tokenizer("gpt2").encode(SENTENCE) and len(ids) == 20
    assert chips[1].get_attribute("title") == "position 1\npiece 'ola'\nid 5708\nbytes 6f 6c 61"

    # 2. The layer / head selectors redraw the attention; every drawn row sums to 1.
    _, cap = forward(model.params, jnp.asarray([ids]), model.config, capture=True)
    pictures = set()
    for layer, head in [(0, 0), (1, 0), (1, 1)]:
        Select(driver.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(driver.find_element(By.ID, "head")).select_by_value(str(head))
        drawn = driver.execute_script("return window.explorer.drawn")
        assert (drawn["layer"], drawn["head"]) == (layer, head)
        rows = drawn["rows"]
        assert [len(r) for r in rows] == list(range(1, 21))
        np.testing.assert_allclose([sum(r) for r in rows], 1.0, atol=1e-4)
        att = np.asarray(cap["layers"][layer]["att"][0, head])
        np.testing.assert_allclose(rows[-1], att[-1], atol=2e-5)
        pictures.add(driver.execute_script(
            "return document.getElementById('attention').toDataURL()"))  # fmt: skip
    assert len(pictures) == 3  # three different pictures on the canvas

    # Hovering query row 5 names what it reads most, shades the tokens by its weights, and draws
    # its head output as the weighted sum of the value vectors (equal to the captured output).
    wait_ready(driver)
    canvas = driver.find_element(By.ID, "attention")
    cell = canvas.size["height"] / 20
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(-canvas.size["width"] / 2 + cell / 2), int((5.5 - 10) * cell)
    ).perform()
    info = driver.find_element(By.ID, "attn-info").text
    assert info.startswith("query 5 ' Est' reads: ")
    top_key = int(np.argmax(np.asarray(cap["layers"][1]["att"][0, 1, 5, :6])))
    assert f"({top_key})" in info.split(", ")[0]
    shaded = [chip.value_of_css_property("background-color") for chip in chips[:7]]
    assert len(set(shaded[:6])) > 1 and shaded[6] != shaded[0]  # keys 0..5 by weight; 6 not read
    weighted = driver.execute_script("return window.explorer.weightedSum")
    assert (weighted["query"], weighted["layer"], weighted["head"]) == (5, 1, 1)
    assert weighted["maxDiff"] < 1e-5

    # 3. Temperature 0 leaves one candidate; temperature 1 with top-k 5 leaves five.
    set_control(driver, "top-k", 5)
    assert driver.find_element(By.ID, "candidates-count").get_attribute("data-count") == "5"
    set_control(driver, "top-k", 0)
    assert int(driver.find_element(By.ID, "candidates-count").get_attribute("data-count")) > 5
    set_control(driver, "temperature", 0)
    assert driver.find_element(By.ID, "candidates-count").get_attribute("data-count") == "1"
    assert driver.find_element(By.ID, "candidates-count").text == "1 candidate"

    # 4. "next token" appends the token jaxgpt.generate picks greedily, and redraws everything.
    driver.find_element(By.ID, "next").click()
    wait_ready(driver, updates=2)
    chips = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    greedy = generate(model.params, model.config, ids, 1, temperature=0)
    assert [int(chip.get_attribute("data-id")) for chip in chips] == greedy
    assert len(driver.execute_script("return window.explorer.drawn.rows")) == 21
    assert driver.execute_script("return window.explorer.data.computed") == "extended"
    assert "one token added with the KV cache" in driver.find_element(By.ID, "timing").text

    # 5. Clicking a token shows the residual stream and logit lens at that position.
    chips[3].click()
    wait_ready(driver)
    assert "position 3 'o'" in driver.find_element(By.ID, "lens-position").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#lens tr")) == 1 + 3

    if os.environ.get("JAXGPT_EXPLORE_SCREENSHOT"):  # the test's page, for a look
        chips[19].click()
        wait_ready(driver)
        driver.save_screenshot(os.environ["JAXGPT_EXPLORE_SCREENSHOT"])

    # 6. A bad prompt: one message in the page, and the page and server go on working.
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("word " * 70)
    driver.find_element(By.ID, "run").click()
    wait_ready(driver)
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed() and "at most 64" in error.text
    prompt.clear()
    prompt.send_keys("Hola")
    driver.find_element(By.ID, "run").click()
    wait_ready(driver, updates=3)
    assert not driver.find_element(By.ID, "error").is_displayed()


def test_the_chat_tab_in_headless_chromium(chat_server, browser, chat_model, tmp_path, capsys):
    """The reply streamed into the page is `jaxgpt chat --prompt`'s (greedy), in several events;
    the second turn reuses the cache; a bad setting shows one line; reset starts a new
    conversation."""
    from selenium.webdriver.common.by import By

    from jaxgpt.pretrained import save_hf

    m, message = chat_model, "What is 2 + 3?"
    driver = browser
    driver.get(chat_server + "/")
    wait_ready(driver)
    driver.find_element(By.ID, "tab-chat").click()
    assert not driver.find_element(By.ID, "chat-absent").is_displayed()
    assert not driver.find_element(By.ID, "journey").is_displayed()
    set_control(driver, "temperature", 0)
    chat_max = driver.find_element(By.ID, "chat-max")
    chat_max.clear()
    chat_max.send_keys("12")

    def send(text: str) -> str:
        driver.find_element(By.ID, "chat-input").send_keys(text)
        driver.find_element(By.ID, "chat-send").click()
        end = time.time() + 120
        while driver.execute_script("return window.explorer.chat.state") == "streaming":
            assert time.time() < end, "the reply did not finish"
            time.sleep(0.05)
        assert driver.execute_script("return window.explorer.chat.state") == "done"
        replies = driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")
        return driver.execute_script("return arguments[0].textContent", replies[-1])

    reference = Conversation(m.params, m.config, m.tokenizer, temperature=0.0, max_new_tokens=12)
    first = send(message)
    assert first == "".join(reference.reply(message)) and first
    assert driver.execute_script("return window.explorer.chat.events") > 2  # pieces, then done
    save_hf(m.config, m.params, tmp_path / "hf", m.tokenizer)
    argv = ["chat", "--model", str(tmp_path / "hf"), "--prompt", message, "--temperature", "0",
            "--max-new-tokens", "12"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out == first + "\n"

    second = send("And 4 + 4?")
    assert second == "".join(reference.reply("And 4 + 4?"))
    stats = driver.find_element(By.ID, "chat-stats").text
    assert stats.startswith(f"turn 2: prefilled {reference.turn_stats[1].prefilled} tokens")

    # A bad setting: one line in the page, the message not added, and the chat goes on.
    chat_max.clear()
    chat_max.send_keys("0")
    driver.find_element(By.ID, "chat-input").send_keys("x")
    driver.find_element(By.ID, "chat-send").click()
    end = time.time() + 30
    while driver.execute_script("return window.explorer.chat.state") == "streaming":
        assert time.time() < end
        time.sleep(0.05)
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed() and "max new tokens must be a whole number >= 1" in error.text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg")) == 4
    driver.find_element(By.ID, "chat-input").clear()
    chat_max.clear()
    chat_max.send_keys("12")

    driver.find_element(By.ID, "chat-reset").click()
    end = time.time() + 30
    while driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg"):
        assert time.time() < end
        time.sleep(0.05)
    assert send(message) == first
    assert driver.find_element(By.ID, "chat-stats").text.startswith("turn 1:")
