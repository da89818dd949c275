"""Example models: GPT (causality, KV-cache generation, offloaded decode), ToST models, the demo."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import jattn
from jattn import demo, offload
from models import gpt, tost, train_tost, training

from cases import assert_close

TINY = gpt.GPTConfig(num_layers=2, dim=32, num_heads=4, num_kv_heads=2, max_length=64)


def test_gpt_is_causal_and_its_loss_is_the_cross_entropy(rng):
    model = gpt.GPT(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 256, (2, 17)), jnp.int32)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % 256)
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (2, 17, 256)
    assert_close(logits_changed[:, :9], np.asarray(logits[:, :9], np.float64), (1e-5, 1e-5))
    assert not np.allclose(logits_changed[:, 9:], logits[:, 9:], atol=1e-3)
    log_probs = jax.nn.log_softmax(np.asarray(logits[:, :-1], np.float64))
    want = -np.mean(np.take_along_axis(log_probs, np.asarray(tokens[:, 1:, None]), -1))
    assert abs(float(gpt.next_token_loss(model, tokens)) - want) < 1e-4


@pytest.mark.slow  # the cache against the full forward: tests/test_nn.py, at the module level
def test_greedy_generation_with_the_cache_matches_the_full_forward(rng):
    model = gpt.GPT(TINY, rngs=nnx.Rngs(1))
    prompt = jnp.asarray(rng.integers(0, 256, (2, 7)), jnp.int32)
    lengths = jnp.array([7, 4])
    got = np.asarray(gpt.generate(model, prompt, 6, prompt_lengths=lengths, temperature=0))
    for b, length in enumerate(lengths.tolist()):  # no cache: re-run the whole sequence each time
        sequence = list(np.asarray(prompt[b, :length]))
        for _ in range(6):
            sequence.append(int(jnp.argmax(model(jnp.asarray([sequence]))[0, -1])))
        assert got[b].tolist() == sequence[length:]


@pytest.mark.parametrize("shard_by, devices", [("heads", 2), ("sequence", 4)])
def test_generation_with_offloaded_decode_matches_one_device(rng, shard_by, devices):
    model = gpt.GPT(TINY, rngs=nnx.Rngs(2))
    prompt = jnp.asarray(rng.integers(0, 256, (2, 5)), jnp.int32)
    want = gpt.generate(model, prompt, 7, temperature=0, cache_length=12)
    mesh = offload.make_mesh(jax.devices()[:devices], "attn")
    calls = []

    def offloaded(*args, **kwargs):
        calls.append(1)
        return offload.sharded_decode_attention(
            *args, mesh=mesh, axis="attn", shard_by=shard_by, **kwargs
        )

    model.set_decode_fn(offloaded)
    sharding = NamedSharding(mesh, offload.cache_spec(shard_by, "attn"))
    got = gpt.generate(model, prompt, 7, temperature=0, cache_length=12, cache_sharding=sharding)
    np.testing.assert_array_equal(got, want)
    assert calls  # traced through the offloaded decode
    assert model.blocks[0].attention.cached_key[...].sharding.is_equivalent_to(sharding, 4)


def test_gpt_demo_trains_and_generates_offloaded(capsys):
    settings = demo.GPTDemo(
        steps=24, batch_size=4, seq_len=32, dim=32, layers=1, sample_tokens=8, corpus_bytes=200_000
    )
    result = demo.gpt_demo(settings, progress=False)
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "sharded_decode_attention" in printed
    assert result["sample"].startswith("def ") and len(result["sample"].encode()) >= 4
    losses = [loss for _, loss in result["losses"]]
    assert losses[-1] < losses[0] and result["val_losses"]
    assert result["attention_devices"] == 4 and result["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("kind", tost.ATTENTION_KINDS)
def test_tost_language_model_is_causal(rng, kind):
    model = tost.CausalLM(tost.LMConfig(attention=kind, max_length=24, dim=32), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 256, (2, 20)), jnp.int32)
    changed = tokens.at[:, 12:].set((tokens[:, 12:] + 7) % 256)
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (2, 20, 256)
    assert_close(logits_changed[:, :12], np.asarray(logits[:, :12], np.float64), (1e-5, 1e-5))
    assert not np.allclose(logits_changed[:, 12:], logits[:, 12:], atol=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        model(jnp.zeros((1, 25), jnp.int32))


def test_tost_sizes_and_what_weight_decay_skips():
    vision = {
        k: tost.VisionTransformer(tost.VisionConfig(attention=k), rngs=nnx.Rngs(0))
        for k in tost.ATTENTION_KINDS
    }
    assert vision["tssa"](jnp.ones((3, 16, 4))).shape == (3, 10)
    # TSSA: one projection where softmax attention has three.
    assert tost.count_params(vision["tssa"]) < tost.count_params(vision["softmax"])
    lm = tost.CausalLM(tost.LMConfig(attention="tssa", max_length=16, dim=32), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    mask = training.decay_mask(params)
    flat = {
        "/".join(map(str, (getattr(k, "key", k) for k in path))): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(mask)
    }
    skipped = {name for name, decays in flat.items() if not decays}
    assert any(name.endswith("temperature") for name in skipped)
    assert any(name.endswith("denom_bias") for name in skipped)  # as the official LM
    assert all(not name.endswith("gamma1") or name in skipped for name in flat)
    assert flat["embed/embedding"] and flat["blocks/0/fc1/kernel"]
    # The same as jattn.nn.weight_decay_mask says for the ToST layers.
    nn_mask = jattn.nn.weight_decay_mask(params)
    assert jax.tree.leaves(nn_mask) == jax.tree.leaves(mask)


def test_tost_vision_training_learns_digits(tmp_path):
    args = train_tost.build_parser().parse_args(
        ["vision", "--workdir", str(tmp_path), "--steps", "60", "--dim", "32", "--depth", "1",
         "--batch-size", "32", "--log-every", "20", "--eval-every", "60", "--no-progress",
         "--warmup-steps", "5", "--learning-rate", "5e-3"]
    )  # fmt: skip
    summary = train_tost.run_vision(args)
    assert summary["test_accuracy"] > 0.4  # 10 classes: chance is 0.1
    assert summary["params"] > 0 and summary["images_per_s"] > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [20, 40, 60, 60]
