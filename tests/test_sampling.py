"""Sampling: temperature, top_k, top_p, min_p and the repetition penalties, each checked
against its definition; decoding with penalties against a step-by-step reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_helpers import dummy_prefix_tokenizer, random_prompts, training_view_logits

from lrulm import generate as gen
from lrulm.model import LanguageModel
from lrulm.model_config import from_preset


@pytest.fixture(scope="module")
def model():
    return LanguageModel(from_preset("test", vocab_size=128), rngs=nnx.Rngs(0))


def _frequencies(logits, n=4000, **kw):
    """How often each id is drawn from logits (1, v) over n keys."""
    sample = functools.partial(gen.sample_logits, **{"top_p": 1.0, "top_k": 0, **kw})
    draws = jax.vmap(lambda k: sample(k, logits)[0])(jax.random.split(jax.random.key(0), n))
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    key = jax.random.key(0)
    assert int(gen.sample_logits(key, logits, temperature=0.0, top_p=1.0, top_k=0)[0]) == 0
    for tiny in (1e-6, 1e-38, 1e-45):  # a temperature near 0 is greedy, not an overflow
        best_last = logits[:, ::-1] + 5  # positive logits: the old overflow picked id 0
        assert int(gen.sample_logits(key, best_last, temperature=tiny, top_p=1.0, top_k=0)[0]) == 3
    keys = jax.random.split(key, 4000)
    free = (
        np.bincount(
            jax.vmap(
                lambda k: gen.sample_logits(k, logits, temperature=1.0, top_p=1.0, top_k=0)[0]
            )(keys),
            minlength=4,
        )
        / 4000
    )
    np.testing.assert_allclose(free, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = np.bincount(
        jax.vmap(lambda k: gen.sample_logits(k, logits, temperature=1.0, top_p=1.0, top_k=2)[0])(
            keys
        ),
        minlength=4,
    )
    assert top2[2] == top2[3] == 0 and abs(top2[0] / 4000 - 0.625) < 0.03
    nucleus = np.bincount(
        jax.vmap(lambda k: gen.sample_logits(k, logits, temperature=1.0, top_p=0.7, top_k=0)[0])(
            keys
        ),
        minlength=4,
    )
    assert nucleus[2] == nucleus[3] == 0  # 0.5 + 0.3 covers 0.7


def test_top_p_keeps_the_token_that_reaches_the_mass():
    """top_p 0.7 of [0.5, 0.3, 0.15, 0.05]: 0.5 alone falls short of 0.7, so the 0.3 is
    kept too (the nucleus is the smallest set reaching top_p), and the two keep their
    proportions, 0.625 and 0.375."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    got = _frequencies(logits, temperature=1.0, top_p=0.7)
    np.testing.assert_allclose(got, [0.625, 0.375, 0.0, 0.0], atol=0.03)
    assert got[2] == got[3] == 0
    np.testing.assert_allclose(  # just past the first token's mass: still both
        _frequencies(logits, temperature=1.0, top_p=0.51), [0.625, 0.375, 0.0, 0.0], atol=0.03
    )
    assert _frequencies(logits, temperature=1.0, top_p=0.5)[0] == 1.0  # 0.5 reaches 0.5


def test_a_completion_keeps_the_space_a_dummy_prefix_tokenizer_drops(tmp_path):
    """With sentencepiece's dummy prefix (its default; another tokenizer than lrulm's
    own), "world" after "hello" decodes alone as "world": the completion is the text the
    new ids add after the prompt, " world"."""
    import sentencepiece as spm

    texts = [f"hello world {i} and more words here\n" for i in range(200)]
    path = dummy_prefix_tokenizer(tmp_path / "dummy", texts, vocab_size=300)
    sp = spm.SentencePieceProcessor(model_file=path)
    prompt, whole = sp.encode("hello"), sp.encode("hello world")
    assert whole[: len(prompt)] == prompt
    new = whole[len(prompt) :]
    assert sp.decode(new) == "world"  # the space a decode of the new ids alone drops
    assert gen._completion(sp, prompt, new) == " world"
    assert gen._completion(sp, prompt, []) == ""


@pytest.mark.parametrize("raw", [False, True])
def test_sampling_takes_one_key_or_a_key_per_row(raw):
    """One key for the batch, typed or raw (jax.random.PRNGKey), or a key per row: a
    row's draw then depends on its own key only."""
    logits = jax.random.normal(jax.random.key(1), (3, 50))
    kw = dict(temperature=1.0, top_p=1.0, top_k=0)
    make = jax.random.PRNGKey if raw else jax.random.key
    assert gen.sample_logits(make(0), logits, **kw).shape == (3,)
    keys = jnp.stack([make(i) for i in (5, 6, 7)])
    rows = gen.sample_logits(keys, logits, **kw)
    for i in range(3):  # each row alone, with its key, draws the same
        assert int(gen.sample_logits(keys[i : i + 1], logits[i : i + 1], **kw)[0]) == rows[i]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(max_new_tokens=0), r"max_new_tokens must be in \[1, 2\*\*31\)"),
        (dict(max_new_tokens=2**31), r"max_new_tokens must be in \[1, 2\*\*31\)"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*32\)"),
        (dict(seed=2**32), r"seed must be in \[0, 2\*\*32\)"),  # would sample as seed 0
    ],
)
def test_bad_sampling_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.generate(model, random_prompts([3]), **kwargs)


def test_pad_is_never_sampled():
    """PAD marks a finished row: drawn mid-text it cut the row short though no stop id
    came (a vocabulary of 8 makes it likely at every step)."""
    small = LanguageModel(from_preset("test", vocab_size=8), rngs=nnx.Rngs(0))
    out = gen.generate(
        small, [[5, 6, 7]] * 4, max_new_tokens=30, temperature=3.0, seed=0, stop_ids=()
    )
    assert [len(row) for row in out] == [30] * 4
    assert all(0 not in row for row in out)


def test_top_k_past_the_vocabulary_keeps_it_all():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 64)

    def draw(top_k):
        sample = functools.partial(gen.sample_logits, temperature=1.0, top_p=1.0, top_k=top_k)
        return jax.vmap(lambda k: sample(k, logits)[0])(keys)

    np.testing.assert_array_equal(draw(100), draw(0))
    np.testing.assert_array_equal(draw(4), draw(0))


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_non_finite_temperature(model, temperature):
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        gen.generate(model, random_prompts([3]), temperature=temperature)


def test_min_p_keeps_the_tokens_within_a_fraction_of_the_likeliest():
    """min_p 0.25 of [0.5, 0.3, 0.15, 0.05]: the 0.05 goes (below 0.125), the rest keep
    their proportions; applied after the temperature, which flattens the distribution."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_allclose(
        _frequencies(logits, temperature=1.0, min_p=0.25),
        np.asarray([0.5, 0.3, 0.15, 0.0]) / 0.95,
        atol=0.03,
    )
    only_two = _frequencies(logits, temperature=1.0, min_p=0.5)
    assert only_two[2] == only_two[3] == 0 and abs(only_two[0] - 0.625) < 0.03
    flat = _frequencies(logits, temperature=2.0, min_p=0.5)  # sqrt: 0.15 is 0.55 of the best
    want = np.sqrt([0.5, 0.3, 0.15, 0.0])
    np.testing.assert_allclose(flat, want / want.sum(), atol=0.03)
    assert _frequencies(logits, temperature=1.0, min_p=0.99)[0] == 1.0
    assert np.array_equal(  # off: the plain draws, key for key
        _frequencies(logits, n=64, temperature=1.0, min_p=0.0),
        _frequencies(logits, n=64, temperature=1.0),
    )


def test_penalties_follow_their_definitions():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0, -4.0]])
    seen = jnp.asarray([[True, True, False, True, False]])
    counts = jnp.asarray([[0, 2, 0, 1, 0]])
    sampling = gen.Sampling(repetition_penalty=2.0)
    # Seen: positive logits halved, negative doubled (always less likely); others kept.
    got = gen.penalize_logits(logits, seen, counts, sampling)
    np.testing.assert_allclose(got, [[1.0, -2.0, 0.5, 1.5, -4.0]])
    sampling = gen.Sampling(presence_penalty=0.5, frequency_penalty=0.25)
    got = gen.penalize_logits(logits, seen, counts, sampling)
    np.testing.assert_allclose(got, [[2.0, -2.0, 0.5, 2.25, -4.0]])
    both = gen.Sampling(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = gen.penalize_logits(logits, seen, counts, both)
    np.testing.assert_allclose(got, [[1.0, -3.0, 0.5, 0.75, -4.0]])
    assert not gen.Sampling().penalised and both.penalised


def _penalised_reference(model, prompt, new, sampling, num_tokens):
    """The scores each of `new`'s tokens was drawn from, computed from the definitions:
    the whole sequence's logits, the prompt's and the earlier new tokens penalised."""
    logits = training_view_logits(model, prompt + new)[len(prompt) - 1 : -1]
    real = (jnp.arange(logits.shape[-1]) < num_tokens) & (jnp.arange(logits.shape[-1]) != 0)
    scores = []
    for i in range(len(new)):
        seen = np.zeros(logits.shape[-1], bool)
        seen[prompt + new[:i]] = True
        counts = np.bincount(new[:i], minlength=logits.shape[-1])
        s = gen.penalize_logits(logits[i][None], seen[None], counts[None], sampling)
        scores.append(jnp.where(real, s[0], -jnp.inf))
    return jnp.where(real, logits, -jnp.inf), scores


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_penalised_decoding_matches_the_definitions_step_by_step(model, temperature):
    """Each new token is the draw (same key) from the logits of the whole sequence so far,
    penalised for the prompt's and the earlier new tokens, then temperature, top_k and
    min_p; the reported log-probabilities stay the model's own. The prompts repeat ids and
    hold an EOS (the counts span documents, as in Hugging Face and vLLM)."""
    eos = gen.tok.EOS_ID
    prompts = [[9, 40, 9, eos, 17, 9], [30, 31, 30], [12]]
    sampling = gen.Sampling(
        temperature=temperature, top_k=40, min_p=0.01,
        repetition_penalty=1.8, presence_penalty=0.4, frequency_penalty=0.3,
    )  # fmt: skip
    seed, steps, num_tokens = 5, 16, 60
    out, logprobs = gen.generate(
        model, prompts, max_new_tokens=steps, seed=seed, stop_ids=(), num_tokens=num_tokens,
        return_logprobs=True, **{k: v for k, v in vars(sampling).items()},
    )  # fmt: skip
    keys = gen.row_keys(jax.random.key(seed), range(len(prompts)))
    for row, (p, new) in enumerate(zip(prompts, out)):
        assert len(new) == steps
        logits, scores = _penalised_reference(model, p, new, sampling, num_tokens)
        want = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(new)[:, None], 1)
        np.testing.assert_allclose(logprobs[row], want[:, 0], rtol=1e-4, atol=1e-4)
        for i, token in enumerate(new):
            key = jax.random.fold_in(keys[row], i)[None]
            draw = gen.sample_logits(
                key, scores[i][None], temperature=temperature, top_p=1.0, top_k=40, min_p=0.01
            )
            assert int(draw[0]) == token, (row, i)
    plain = gen.generate(
        model, prompts, max_new_tokens=steps, seed=seed, stop_ids=(), num_tokens=num_tokens,
        temperature=temperature, top_k=40, min_p=0.01,
    )  # fmt: skip
    assert plain != out  # the penalties changed the draws


def test_a_presence_penalty_stops_greedy_loops(model):
    """This random model's greedy text repeats one token; a large presence penalty makes
    every generated token new, a large repetition penalty nearly so."""
    prompts = random_prompts([5, 9])
    kw = dict(max_new_tokens=30, temperature=0.0, stop_ids=())
    assert all(len(set(row)) < 5 for row in gen.generate(model, prompts, **kw))
    fresh = gen.generate(model, prompts, presence_penalty=1e4, **kw)
    assert all(len(set(row)) == 30 for row in fresh)
    varied = gen.generate(model, prompts, repetition_penalty=3.0, **kw)
    assert all(len(set(row)) > 20 for row in varied)


def test_penalised_streaming_gives_the_tokens_of_one_go(model):
    """The counts travel in the decode loop's carry: decoding in chunks of any size (as
    `--stream` does) draws the same tokens."""
    prompts = random_prompts([4, 7])
    kw = dict(max_new_tokens=13, temperature=1.0, seed=3, stop_ids=(), frequency_penalty=2.0)
    want = gen.generate(model, prompts, **kw)
    for every in (1, 3, 13):
        assert gen.generate(model, prompts, on_tokens=lambda t: None, stream_every=every, **kw) == (
            want
        ), every


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=2.5), "top_k must be a whole number >= 0"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\)"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a number > 0"),
        (dict(presence_penalty=float("inf")), "presence_penalty must be a finite number"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
    ],
)
def test_bad_penalties(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.generate(model, random_prompts([3]), **kwargs)


def test_generate_command_takes_the_sampling_flags(lm_workdir, capsys, monkeypatch):
    """`lrulm generate --min_p --repetition_penalty --presence_penalty --frequency_penalty`
    gives generate_texts' samples; a bad value is one line and exit 2, before loading."""
    from lrulm import metrics as metrics_lib
    from lrulm.main import main

    # main() sends messages to stderr for the rest of the process: restored after the test.
    monkeypatch.setattr(metrics_lib, "_MESSAGES_TO_STDERR", metrics_lib._MESSAGES_TO_STDERR)
    kw = dict(
        min_p=0.05, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1,
        temperature=0.9, seed=2, max_new_tokens=12, stop=("\n\n\n",),
    )  # fmt: skip
    (want,) = gen.generate_texts(lm_workdir, ["class A"], **kw)
    # A str is one prompt (one stop text), not its characters.
    assert gen.generate_texts(lm_workdir, "class A", **{**kw, "stop": "\n\n\n"}) == [want]
    (plain,) = gen.generate_texts(
        lm_workdir, ["class A"], temperature=0.9, seed=2, max_new_tokens=12
    )
    assert want["completion"] != plain["completion"]
    # Each sample records what drew it: those settings give it again.
    assert want["sampling"]["repetition_penalty"] == 1.3 and want["sampling"]["seed"] == 2
    assert want["sampling"]["stop"] == ["\n\n\n"]
    (again,) = gen.generate_texts(lm_workdir, ["class A"], **want["sampling"])
    assert again == want
    flags = [x for k, v in kw.items() if k != "stop" for x in (f"--{k}", str(v))]
    flags += ["--stop", "\\n\\n\\n"]  # as a shell passes '\n\n\n'
    assert main(["generate", "--workdir", lm_workdir, "--prompt", "class A", *flags]) == 0
    assert "class A" + want["completion"] in capsys.readouterr().out
    args = ["generate", "--workdir", lm_workdir, "--prompt", "x", "--repetition_penalty", "-1"]
    assert main(args) == 2
    assert "repetition_penalty must be a number > 0" in capsys.readouterr().err


def test_each_filter_at_its_edges():
    """top_k=1 is greedy; top_p filters each row of a batch by its own mass; a frequency
    penalty alone is a penalty (counted in the decode loop); top_k < 0 is refused."""
    probs = jnp.asarray([[0.5, 0.3, 0.15, 0.05]])
    assert _frequencies(jnp.log(probs), temperature=1.0, top_k=1)[0] == 1.0
    # Two rows, each its own nucleus: row 0 keeps ids {0, 1}, row 1 ids {3, 2}.
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = np.asarray(jax.vmap(lambda k: gen.sample_logits(
        k, logits, temperature=1.0, top_p=0.7, top_k=0))(keys))  # fmt: skip
    assert set(draws[:, 0]) == {0, 1} and set(draws[:, 1]) == {2, 3}
    np.testing.assert_allclose(np.mean(draws[:, 1] == 3), 0.5 / 0.8, atol=0.03)
    counts = jnp.asarray([[0, 2, 0, 1]])
    only_frequency = gen.Sampling(frequency_penalty=0.25)
    assert only_frequency.penalised and not gen.Sampling().penalised
    assert gen.Sampling(presence_penalty=0.1).penalised
    got = gen.penalize_logits(probs, counts > 0, counts, only_frequency)
    np.testing.assert_allclose(got, probs - 0.25 * counts)
    with pytest.raises(ValueError, match="top_k must be a whole number >= 0"):
        gen.Sampling(top_k=-1)
