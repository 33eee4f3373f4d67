"""Sampling filters against Hugging Face's logits warpers (ties included), and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.errors import InputError
from jaxgpt.sampling import Greedy, RandomSampling, make_sampler, top_k_filter, top_p_filter


@pytest.fixture
def transformers():
    """Hugging Face's warpers, the reference; only the tests that compare with them need it (the
    torch-free tests below run on an install without the `hf` extra)."""
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def random_logits(seed: int, tied: bool) -> np.ndarray:
    """[6, 50] logits; with `tied`, rounded to a coarse grid so many values repeat."""
    logits = np.random.RandomState(seed).randn(6, 50).astype(np.float32) * 2.0
    if tied:
        logits = np.round(logits)  # integers in about [-6, 6]: every row has many ties
        assert max(len(r) - len(np.unique(r)) for r in logits) > 10
    return logits


def hf_apply(warpers, logits: np.ndarray) -> np.ndarray:
    import torch

    scores = torch.tensor(logits)
    input_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores.numpy()


@pytest.fixture
def stable_torch_sort(monkeypatch):
    """Make `torch.sort` stable while Hugging Face's warpers run.

    TopPLogitsWarper sorts with `torch.sort`, whose order among equal values is unspecified (on
    this CPU build it is not stable for 50 values), so when tied tokens straddle the top-p
    boundary, which of them Hugging Face drops depends on the sort algorithm. jaxgpt uses the
    same algorithm with a stable sort; with torch's sort made stable the two must agree exactly.
    """
    torch = pytest.importorskip("torch")
    original = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **kw: original(*a, **kw, stable=True))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_matches_transformers(k, tied, transformers):
    logits = random_logits(k, tied)
    ours = np.asarray(top_k_filter(jnp.asarray(logits), k))
    theirs = hf_apply([transformers.TopKLogitsWarper(top_k=k)], logits)
    np.testing.assert_array_equal(ours, theirs)
    assert (np.isfinite(ours).sum(-1) >= k).all()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_matches_transformers(p, tied, stable_torch_sort, transformers):
    logits = random_logits(int(p * 100), tied)
    ours = np.asarray(top_p_filter(jnp.asarray(logits), p))
    theirs = hf_apply([transformers.TopPLogitsWarper(top_p=p)], logits)
    np.testing.assert_array_equal(ours, theirs)
    if p < 1.0:
        assert (~np.isfinite(ours)).any()  # the filter actually removed something


def test_top_p_ties_straddle_the_boundary(stable_torch_sort, transformers):
    """The tied case above really has kept and dropped tokens with the same logit."""
    logits = random_logits(50, tied=True)
    ours = np.asarray(top_p_filter(jnp.asarray(logits), 0.5))
    kept = np.isfinite(ours)
    straddles = [np.isin(logits[r][kept[r]], logits[r][~kept[r]]).any() for r in range(len(logits))]
    assert any(straddles)
    np.testing.assert_array_equal(ours, hf_apply([transformers.TopPLogitsWarper(0.5)], logits))


@pytest.mark.parametrize("tied", [False, True])
def test_combined_chain_matches_transformers(tied, stable_torch_sort, transformers):
    logits = random_logits(7, tied)
    sampler = RandomSampling(temperature=0.7, top_k=12, top_p=0.8)
    ours = np.asarray(sampler.filter_logits(jnp.asarray(logits)))
    theirs = hf_apply(
        [
            transformers.TemperatureLogitsWarper(0.7),
            transformers.TopKLogitsWarper(top_k=12),
            transformers.TopPLogitsWarper(top_p=0.8),
        ],
        logits,
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))


def test_samples_only_from_kept_tokens():
    logits = jnp.asarray(random_logits(3, tied=False))
    sampler = RandomSampling(temperature=1.0, top_k=3)
    allowed = np.isfinite(np.asarray(sampler.filter_logits(logits)))
    for seed in range(20):
        tok = np.asarray(sampler(logits, jax.random.key(seed)))
        assert allowed[np.arange(len(tok)), tok].all()


def test_make_sampler_kinds():
    assert isinstance(make_sampler(0.0), Greedy)
    s = make_sampler(0.5, top_k=4, top_p=0.9)
    assert isinstance(s, RandomSampling) and (s.temperature, s.top_k, s.top_p) == (0.5, 4, 0.9)
    logits = jnp.asarray(random_logits(1, tied=False))
    np.testing.assert_array_equal(make_sampler(0)(logits, None), np.argmax(logits, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "finite number"),
        (dict(temperature=float("inf")), "finite number"),
        (dict(temperature=True), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        make_sampler(**kwargs)


def test_random_sampling_needs_key():
    with pytest.raises(InputError, match="key"):
        RandomSampling()(jnp.zeros((1, 4)), None)


def test_torch_free_tests_run_without_torch():
    """Run this module in a subprocess where torch and transformers cannot be imported: the
    comparisons with Hugging Face skip, every other test runs and passes."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r}, "
        "'-k', 'not without_torch']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and " passed" in summary, summary
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 10, summary
