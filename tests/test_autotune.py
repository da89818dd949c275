"""`jattn.autotune`: buckets, cache files (and their failures), lookup order, the Triton kernel's
use of tuned configs, the tuner end to end on CPU, the shipped H100 table and the CLI."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tomllib
import warnings
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import autotune, cli, reference
from jattn.autotune import cache
from pallas_kernels import flash_triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "results" / "triton_configs_h100_bf16_T4096.json"
H100 = "nvidia_h100_80gb_hbm3"
H200 = "nvidia_h200"
H200_LOG = ROOT / "benchmarks" / "results" / "autotune_mosaic_h200_h64.jsonl"
# Deliberately unusual: nothing the heuristic would pick for H=16 float32 (64/32 blocks).
ODD = flash_triton.TritonConfig(
    block_q=16, block_k=16, num_warps=2, num_stages=1, bwd_block_q=16, bwd_block_k=16
)


@pytest.fixture
def cache_file(monkeypatch, tmp_path) -> pathlib.Path:
    """A fresh user cache path through the environment variable; lookups on."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    monkeypatch.delenv(autotune.ENABLE_ENV, raising=False)
    return path


def _bucket(**overrides) -> autotune.Bucket:
    fields = dict(
        implementation="triton",
        device="cpu",
        head_dim=16,
        dtype="float32",
        causal=True,
        lengths="<=1024",
    )
    return autotune.Bucket(**(fields | overrides))


def _entry(config=ODD, **bucket) -> autotune.Entry:
    return autotune.Entry(_bucket(**bucket), dataclasses.asdict(config), {"forward": 1.0})


def _lookup(**overrides):
    call = dict(head_dim=16, dtype=jnp.float32, causal=True, length=32, device="cpu")
    return autotune.lookup("triton", **(call | overrides))


def test_config_and_bucket_validation():
    with pytest.raises(ValueError, match="block_q"):
        flash_triton.TritonConfig(block_q=48)
    with pytest.raises(ValueError, match="num_warps"):
        flash_triton.TritonConfig(num_warps=3)
    with pytest.raises(ValueError, match="bwd_num_stages"):
        flash_triton.TritonConfig(bwd_num_stages=0)
    for bad in (
        dict(head_dim=80),
        dict(head_dim=128.0),
        dict(head_dim=True),
        dict(dtype="float64"),
        dict(causal=1),
        dict(lengths="<=2048"),
        dict(device=""),
    ):
        with pytest.raises(ValueError):
            _bucket(**bad)
    with pytest.raises(ValueError, match="mode"):
        autotune.Search(name="x", mode="backward", candidates=lambda b, c: [])


def test_buckets_pad_the_head_dim_and_range_the_length():
    bucket = autotune.bucket_for(
        "triton", head_dim=80, dtype=jnp.bfloat16, causal=False, length=1025, device="x"
    )
    assert bucket == _bucket(
        device="x", head_dim=128, dtype="bfloat16", causal=False, lengths="<=4096"
    )
    assert [cache.length_range(n) for n in (1, 1024, 1025, 4096, 4097, 10**6)] == [
        "<=1024",
        "<=1024",
        "<=4096",
        "<=4096",
        ">4096",
        ">4096",
    ]
    assert [cache.bucket_head_dim(h) for h in (1, 16, 17, 64, 72, 256)] == [
        16,
        16,
        32,
        64,
        128,
        256,
    ]
    assert cache.normalize_device_kind("NVIDIA H100 80GB HBM3") == H100
    assert autotune.bucket_for("t", head_dim=64, dtype="float16", causal=True, length=8).device == (
        cache.normalize_device_kind(jax.devices()[0].device_kind)
    )


def test_cache_round_trip_is_atomic_and_reloads_on_change(cache_file):
    assert _lookup() is None  # no file yet: no warning, nothing found
    other = _entry(head_dim=64, causal=False)
    autotune.save(cache_file, [_entry(), other])
    assert sorted(os.listdir(cache_file.parent)) == ["autotune.json"]  # no temp file left
    data = json.loads(cache_file.read_text())
    assert (data["format"], data["version"]) == (cache.FORMAT, cache.VERSION)
    assert autotune.load(cache_file) == {e.bucket: e for e in (_entry(), other)}
    assert _lookup() == ODD
    assert _lookup(causal=False) is None  # another bucket
    query, key = jnp.zeros((1, 20, 2, 12)), jnp.zeros((1, 32, 1, 12))  # length max(T, S) = 32
    assert autotune.lookup_call("triton", query, key, causal=True) == ODD
    assert autotune.lookup_call("triton", query, key, causal=False) is None
    assert _lookup(head_dim=12) == ODD and _lookup(length=1024) == ODD  # the same bucket
    assert _lookup(dtype=np.float64) is None  # no bucket holds it (the kernel declines it)
    assert autotune.resolve(_bucket()) == (ODD, "cache")

    # a change on disk is seen by the next lookup (memoized by mtime, size and inode)
    changed = dataclasses.replace(ODD, block_q=32)
    record = json.loads(cache_file.read_text())
    record["entries"][0]["config"]["block_q"] = 32
    cache_file.write_text(json.dumps(record))
    assert _lookup() == changed


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00binary",
        b'{"hello": "world"}',
        b'["a list"]',
        b'{"format": "jattn-autotune", "version": 999, "entries": []}',
        b'{"format": "jattn-autotune", "version": 1, "entries": "nope"}',
    ],
)
def test_unusable_file_warns_once_and_falls_back(cache_file, content):
    cache_file.write_bytes(content)
    with pytest.warns(autotune.AutotuneCacheWarning):
        assert _lookup() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file again: no second warning
        assert _lookup() is None
        config, source = autotune.resolve(_bucket())
    assert source == "default" and config == flash_triton.default_config(16, jnp.float32)


def test_invalid_entries_are_skipped_the_valid_ones_kept(cache_file):
    good = _entry(causal=False)
    unknown_field = dict(_entry().to_json(), config={"block_z": 16})
    invalid_value = dict(_entry(dtype="float16").to_json())
    invalid_value["config"] = dict(invalid_value["config"], block_q=48)
    bad_bucket = dict(_entry(head_dim=32).to_json(), head_dim="x")
    missing_config = {k: v for k, v in _entry(head_dim=64).to_json().items() if k != "config"}
    record = dict(
        format=cache.FORMAT,
        version=cache.VERSION,
        entries=[unknown_field, invalid_value, good.to_json(), bad_bucket, missing_config, 7],
    )
    cache_file.write_text(json.dumps(record))
    with pytest.warns(autotune.AutotuneCacheWarning) as caught:
        assert _lookup(causal=False) == ODD
        assert _lookup() is None  # unknown field: rejected by TritonConfig
        assert _lookup(dtype=jnp.float16) is None  # block_q=48: rejected by validation
    messages = " ".join(str(w.message) for w in caught)
    assert "block_z" in messages and "block_q" in messages and "entry 5" in messages


def test_cache_path_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "mine.json"))
    assert autotune.cache_path() == tmp_path / "mine.json"
    monkeypatch.delenv(autotune.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "jattn" / "autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_path() == tmp_path / "home" / ".cache" / "jattn" / "autotune.json"


def test_a_float16_bucket_without_entries_takes_bfloat16s(cache_file):
    """float16 and bfloat16 run the same tiles at the same rate (`cache.SIBLING_DTYPES`): a
    float16 call finds a bfloat16 entry, unless an entry of its own exists (in any source); the
    reverse does not hold, and float32 has no sibling."""
    other = dataclasses.replace(ODD, num_warps=4)
    autotune.save(cache_file, [_entry(dtype="bfloat16")])
    assert _lookup(dtype=jnp.float16) == ODD
    assert _lookup(dtype=jnp.bfloat16) == ODD
    assert _lookup(dtype=jnp.float32) is None
    # where the config came from says which dtype's entry it is
    assert autotune.resolve(_bucket(dtype="float16")) == (ODD, "cache (bfloat16)")
    assert autotune.resolve(_bucket(dtype="bfloat16")) == (ODD, "cache")
    autotune.save(cache_file, [_entry(dtype="bfloat16"), _entry(other, dtype="float16")])
    assert _lookup(dtype=jnp.float16) == other
    assert autotune.resolve(_bucket(dtype="float16")) == (other, "cache")
    autotune.save(cache_file, [_entry(dtype="float16")])
    assert _lookup(dtype=jnp.bfloat16) is None


def test_shipped_h200_mosaic_table_serves_float16_with_the_bfloat16_tiles():
    """On the H200, float16 at H = 128 gets bfloat16's tuned 128-key tiles, not the heuristic's
    64 (6-12% faster there; stop 37)."""
    call = dict(head_dim=128, causal=False, length=4096, device="nvidia_h200")
    tuned = autotune.lookup("mosaic", dtype=jnp.bfloat16, **call)
    assert tuned is not None and tuned.block_kv == 128
    assert autotune.lookup("mosaic", dtype=jnp.float16, **call) == tuned


def test_lookups_can_be_turned_off(cache_file, monkeypatch):
    autotune.save(cache_file, [_entry()])
    assert _lookup() == ODD
    monkeypatch.setenv(autotune.ENABLE_ENV, "0")
    assert not autotune.enabled() and _lookup() is None
    assert autotune.resolve(_bucket())[1] == "default"


def _spy_static(monkeypatch) -> list:
    """Record the _Static (tiles, stages) each Triton call is built with."""
    seen = []
    original = flash_triton._attention_vjp

    def spy(st):
        seen.append(st)
        return original(st)

    monkeypatch.setattr(flash_triton, "_attention_vjp", spy)
    return seen


def _tiles(st) -> tuple[int, ...]:
    return (st.block_q, st.block_k, st.num_warps, st.num_stages, st.bwd_block_q, st.bwd_block_k)


def test_config_none_uses_the_cached_config(cache_file, monkeypatch, rng):
    seen = _spy_static(monkeypatch)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 2, 16)), jnp.float32) for _ in range(3))
    attend = lambda config=None: jattn.dot_product_attention(
        q, k, v, is_causal=True, implementation="triton", config=config
    )
    jax.eval_shape(attend)  # nothing stored: the heuristic (64/32 tiles, fit to T = 32)
    autotune.save(cache_file, [_entry()])
    out = attend()  # runs the kernel (interpret mode) with the cached tiles
    explicit = dataclasses.replace(ODD, block_q=32, block_k=32)
    jax.eval_shape(lambda: attend(explicit))  # an explicit config wins over the cache
    assert [_tiles(st) for st in seen] == [
        (32, 32, 4, 2, 32, 32),
        (16, 16, 2, 1, 16, 16),
        (32, 32, 2, 1, 16, 16),
    ]
    want = reference.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_tuned_configs_are_shrunk_to_shared_memory_like_defaults(cache_file, monkeypatch):
    seen = _spy_static(monkeypatch)
    tuned = flash_triton.TritonConfig(block_q=32, block_k=64, num_warps=4, num_stages=4)
    autotune.save(cache_file, [_entry(tuned, head_dim=64, dtype="float16", causal=False)])
    monkeypatch.setattr(flash_triton.common, "shared_memory_bytes", lambda: 60_000)
    q = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.float16)
    bias = jax.ShapeDtypeStruct((1, 1, 128, 128), jnp.float16)
    attend = lambda q, k, v, b=None: jattn.dot_product_attention(
        q, k, v, b, implementation="triton"
    )
    jax.eval_shape(attend, q, q, q)
    jax.eval_shape(attend, q, q, q, bias)
    # 32 rows resident + per stage two 64-row tiles (4 stages: 70 kB, 3: 53 kB) and with a bias a
    # 32x64 bias tile (3 stages: 66 kB, 2: 45 kB); the heuristic would start from 64/64/3
    assert [(st.block_q, st.block_k, st.num_stages) for st in seen] == [(32, 64, 3), (32, 64, 2)]


def test_shipped_h100_table_holds_the_sweep_winners(cache_file):
    tables = {p.name: p for p in autotune.shipped_tables()}
    assert sorted(tables) == [f"{H100}.json", f"{H200}.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entries = autotune.load(tables[f"{H100}.json"])
        configs = {
            b: flash_triton.TritonConfig(**e.config)
            for b, e in entries.items()
            if b.implementation == "triton"
        }
    # the winners of the committed H100 sweep (bf16, T = 4096), forward and backward fields apart
    best = defaultdict(lambda: (float("inf"), None))
    for row in json.loads(SWEEP.read_text())["rows"]:
        key = (row["head_dim"], row["causal"], row["mode"])
        if "ms" in row and row["ms"] < best[key][0]:
            best[key] = (row["ms"], row["config"])
    want = {}
    for (head_dim, causal, mode), (_, (bq, bk, warps, stages)) in best.items():
        if mode != "fwd":
            continue
        bwd_q, bwd_k, bwd_warps, bwd_stages = best[(head_dim, causal, "fwd+bwd")][1]
        bucket = _bucket(
            device=H100, head_dim=head_dim, dtype="bfloat16", causal=causal, lengths="<=4096"
        )
        want[bucket] = flash_triton.TritonConfig(
            block_q=bq,
            block_k=bk,
            num_warps=warps,
            num_stages=stages,
            bwd_block_q=bwd_q,
            bwd_block_k=bwd_k,
            bwd_num_warps=bwd_warps,
            bwd_num_stages=bwd_stages,
        )
    assert configs == want and len(want) == 6
    # the Mosaic entries: the last search's winner per bucket in the committed tuning logs
    winners = {}
    for log in sorted((ROOT / "benchmarks" / "results").glob("autotune_mosaic_h100_*.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        for bucket in {row["bucket"] for row in rows}:
            mine = [row for row in rows if row["bucket"] == bucket and "ms" in row]
            last = [row for row in mine if row["search"] == mine[-1]["search"]]
            winners[bucket] = min(last, key=lambda row: row["ms"])["config"]
    mosaic = {str(b): e.config for b, e in entries.items() if b.implementation == "mosaic"}
    assert len(mosaic) == 8 and all(winners[b] == config for b, config in mosaic.items())

    h100 = dict(head_dim=128, dtype=jnp.bfloat16, causal=True, length=4096, device=H100)
    assert _lookup(**h100) == dataclasses.replace(
        flash_triton.default_config(128, jnp.bfloat16), block_k=64
    )
    assert _lookup(**(h100 | dict(length=16384))) is None  # not measured: the heuristic
    mine = autotune.Entry(autotune.bucket_for("triton", **h100), dataclasses.asdict(ODD))
    autotune.save(cache_file, [mine])  # the user's cache comes before the shipped table
    assert _lookup(**h100) == ODD
    # and the wheel carries the tables
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["jattn.autotune"]
    package = ROOT / "jattn" / "autotune"
    shipped = set(tables.values()) | {package / "dispatch_tables" / "nvidia_h200.json"}
    assert {p for g in package_data for p in package.glob(g)} == shipped


def _tiny_space(monkeypatch):
    """The Triton forward search cut to two candidates besides the heuristic start."""
    monkeypatch.setattr(
        jattn.triton,
        "_FORWARD_SPACE",
        dict(block_q=(16,), block_k=(16, 32), warps=(4,), stages=(1,)),
    )


TINY = dict(head_dims=[16], dtypes=["float32"], causal=[True], lengths=[32], tokens=32, hidden=32)


def test_tune_end_to_end_on_cpu(cache_file, monkeypatch):
    _tiny_space(monkeypatch)
    autotune.save(cache_file, [_entry(causal=False)])  # another bucket: must survive the merge
    with pytest.raises(RuntimeError, match="GPU"):
        autotune.tune("triton", **TINY, searches=["forward"])
    start = flash_triton.default_config(16, jnp.float32)
    slow = dataclasses.replace(start, block_q=16, block_k=32, num_stages=1)
    fast = dataclasses.replace(slow, block_k=16)
    calls = []

    def timer(fn):  # runs the kernel (interpret mode), then a made-up time per config
        out = jax.block_until_ready(fn())
        assert out.shape == (1, 32, 2, 16) and bool(jnp.all(jnp.isfinite(out)))
        config = calls[-1]
        if config == start:
            raise RuntimeError("out of shared memory\nsecond line")  # a failing candidate
        return {slow: 2.0, fast: 1.0}[config]

    original_run = autotune.tuner.default_run

    def run(bucket, config, mode, problem):
        calls.append(config)
        return original_run(bucket, config, mode, problem)

    monkeypatch.setattr(autotune.tuner, "default_run", run)
    [result] = autotune.tune(
        "triton", **TINY, searches=["forward"], allow_cpu=True, timer=timer, progress=False
    )
    assert calls == [start, fast, slow]
    assert result.config == fast and result.ms == {"forward": 1.0} and result.default_ms == {}
    assert len(result.skipped) == 1 and "out of shared memory" in result.skipped[0]
    assert "second line" not in result.skipped[0]
    assert _lookup() == fast  # the next lookup sees the winner
    assert _lookup(causal=False) == ODD
    [stored] = [e for e in autotune.load(cache_file).values() if e.bucket.causal]
    assert stored.ms == {"forward": 1.0} and stored.measured["length"] == 32


def test_tune_runs_searches_in_order_from_the_winner(cache_file, monkeypatch, tmp_path):
    """A registered tunable of its own (what a kernel does to join): the second search starts
    from the first one's winner; the plan is validated."""

    @dataclasses.dataclass(frozen=True)
    class Toy:
        a: int = 1
        b: int = 1

    searches = [
        autotune.Search(
            name="a", mode="forward", candidates=lambda bucket, c: [Toy(2, c.b), Toy(3, c.b)]
        ),
        autotune.Search(
            name="b", mode="forward+backward", candidates=lambda bucket, c: [Toy(c.a, 5)]
        ),
    ]
    monkeypatch.setattr(cache, "_TUNABLES", dict(cache._TUNABLES))
    autotune.register_tunable(
        "toy", Toy, default=lambda bucket: Toy(), searches=searches, run=lambda *args: args
    )
    seen = []

    def timer(args):
        bucket, config, mode, problem = args
        seen.append((config, mode, problem))
        return float(abs(config.a - 2) + abs(config.b - 5))

    options = dict(head_dims=[64], causal=[False], lengths=[100], tokens=400, hidden=128)
    log_file = tmp_path / "candidates.jsonl"
    [result] = autotune.tune(
        "toy", **options, allow_cpu=True, timer=timer, progress=False, log_file=log_file
    )
    assert result.config == Toy(2, 5) and result.ms == {"a": 4.0, "b": 0.0}
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(row["search"], row["config"], row["ms"]) for row in logged] == [
        ("a", {"a": 1, "b": 1}, 5.0),
        ("a", {"a": 2, "b": 1}, 4.0),
        ("a", {"a": 3, "b": 1}, 5.0),
        ("b", {"a": 2, "b": 1}, 4.0),
        ("b", {"a": 2, "b": 5}, 0.0),
    ]
    assert result.default_ms == {"a": 5.0, "b": 4.0}
    assert seen == [
        (Toy(1, 1), "forward", (4, 100, 2)),
        (Toy(2, 1), "forward", (4, 100, 2)),
        (Toy(3, 1), "forward", (4, 100, 2)),
        (Toy(2, 1), "forward+backward", (4, 100, 2)),
        (Toy(2, 5), "forward+backward", (4, 100, 2)),
    ]
    assert autotune.resolve(dataclasses.replace(result.bucket))[0] == Toy(2, 5)
    # a later search alone (`--searches b`) starts from what config=None uses now: the cache's
    # Toy(2, 5), not the default, so the retune keeps search a's choice; a run from the first
    # search starts from the default
    [later] = autotune.plan("toy", **options, searches=["b"])
    assert later.default == Toy(2, 5) and later.candidates == {"b": [Toy(2, 5)]}
    assert autotune.plan("toy", **options, searches=["a"])[0].default == Toy()
    with pytest.raises(ValueError, match="one length range"):
        autotune.plan("toy", lengths=[2048, 4096])
    with pytest.raises(ValueError, match="unknown searches"):
        autotune.plan("toy", searches=["c"])
    with pytest.raises(ValueError, match="not tunable"):
        autotune.plan("nonsense")


def test_cli_help_and_dry_run(cache_file, capsys, monkeypatch):
    result = subprocess.run(
        [sys.executable, "-m", "jattn.cli", "autotune", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: jattn autotune" in result.stdout
    assert "--dry-run" in result.stdout and autotune.CACHE_ENV in result.stdout
    _tiny_space(monkeypatch)
    argv = ["autotune", "--head-dims", "16", "--dtypes", "float32", "--causal", "yes"]
    options = ["--lengths", "32", "5000", "--hidden", "32", "--searches", "forward", "--dry-run"]
    assert cli.main([*argv, *options]) == 0
    printed = capsys.readouterr().out
    assert f"cache: {cache_file}" in printed and "2 buckets, 6 candidates" in printed
    assert "H=16 float32 causal T<=1024: B=512 T=S=32 N=2" in printed
    assert "T>4096: B=3 T=S=5000 N=2" in printed
    assert "forward: 3 candidates" in printed and "backward:" not in printed
    assert not cache_file.exists()  # a dry run writes nothing
    with pytest.raises(SystemExit):  # no GPU: refused without --allow-cpu
        cli.main([*argv, "--lengths", "32"])
    with pytest.raises(SystemExit):
        cli.main([*argv, "--lengths", "32", "64", "--dry-run"])


# --- hardening (issue 19): deep JSON, FIFOs, concurrent writers, bad values, read-only folders --


def test_deeply_nested_json_is_skipped_with_a_warning(cache_file):
    cache_file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.warns(autotune.AutotuneCacheWarning, match="not valid JSON"):
        assert _lookup() is None
    deep = dict(_entry().to_json(), config={"block_q": [[[[[[16]]]]]] * 1})
    cache_file.write_text(json.dumps(dict(format=cache.FORMAT, version=1, entries=[deep])))
    with pytest.warns(autotune.AutotuneCacheWarning, match="not a finite scalar"):
        assert _lookup() is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_at_the_cache_path_is_skipped_never_blocks(cache_file):
    """Opening a FIFO for reading blocks until a writer comes: a lookup must not open it."""
    os.mkfifo(cache_file)
    code = (
        "import warnings, jax.numpy as jnp\n"
        "from jattn import autotune\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    found = autotune.lookup('triton', head_dim=16, dtype=jnp.float32, causal=True,"
        " length=32, device='cpu')\n"
        "print(found, any('regular file' in str(x.message) for x in w))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "True"]
    with pytest.raises(OSError, match="not a regular file"):
        autotune.save(cache_file, [_entry()])


def _merge_distinct(path: str, worker: int, count: int) -> None:
    from jattn.autotune import cache as worker_cache

    for i in range(count):
        bucket = worker_cache.Bucket(
            implementation="triton", device=f"dev{worker}_{i}", head_dim=16, dtype="float32",
            causal=True, lengths="<=1024",
        )  # fmt: skip
        worker_cache.merge(path, [worker_cache.Entry(bucket, {"block_q": 16}, {"forward": 1.0})])


def test_concurrent_writers_keep_every_entry(tmp_path):
    """Four processes merging 20 distinct entries each into one file at the same time: all 80
    survive (the lock covers read-merge-rename)."""
    import multiprocessing

    path = str(tmp_path / "shared.json")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_merge_distinct, args=(path, w, 20)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=240)
        assert p.exitcode == 0
    stored = autotune.load(path)
    assert len(stored) == 80
    assert {b.device for b in stored} == {f"dev{w}_{i}" for w in range(4) for i in range(20)}


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_q", float("nan")),
        ("block_k", float("inf")),
        ("num_warps", 4.0),
        ("num_stages", True),
    ],
)
def test_nan_and_wrongly_typed_config_values_are_ignored(cache_file, field, value):
    entry = dict(_entry().to_json())
    entry["config"] = dict(entry["config"], **{field: value})
    good = _entry(causal=False).to_json()
    record = dict(format=cache.FORMAT, version=cache.VERSION, entries=[entry, good])
    cache_file.write_text(json.dumps(record))  # json writes NaN and Infinity tokens
    with pytest.warns(autotune.AutotuneCacheWarning, match=field):
        assert _lookup() is None
    assert _lookup(causal=False) == ODD


@pytest.mark.parametrize("place", ["read-only folder", "folder is a file"])
def test_cli_into_an_unwritable_folder_prints_a_message(tmp_path, capsys, place):
    folder = tmp_path / "cache"
    if place == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder.mkdir()
        folder.chmod(0o500)
    else:
        folder.write_text("a file where the cache folder should be")
    argv = ["autotune", "--head-dims", "16", "--dtypes", "float32", "--causal", "yes"]
    argv += ["--lengths", "32", "--allow-cpu", "--cache", str(folder / "autotune.json")]
    try:
        assert cli.main(argv) == 1
    finally:
        if folder.is_dir():
            folder.chmod(0o700)
    err = capsys.readouterr().err
    assert "jattn autotune: cannot write" in err and "Traceback" not in err


def test_finalists_are_timed_again_together(cache_file, monkeypatch, tmp_path):
    """With the default timer, the fastest candidates of a search are timed again in rounds
    and the winner comes from those times (clock drift between candidates timed apart)."""
    import time

    @dataclasses.dataclass(frozen=True)
    class Toy:
        a: int = 1

    searches = [
        autotune.Search(name="a", mode="forward", candidates=lambda bucket, c: [Toy(2), Toy(3)])
    ]
    monkeypatch.setattr(cache, "_TUNABLES", dict(cache._TUNABLES))
    calls = []

    def run(bucket, config, mode, problem):
        def fn():  # Toy(2) fastest: 2 ms, others 6 ms (a loaded 2-core host adds ~1 ms a call)
            calls.append(config.a)
            time.sleep(0.002 if config.a == 2 else 0.006)
            return config.a

        return fn

    autotune.register_tunable("toy", Toy, default=lambda bucket: Toy(), searches=searches, run=run)
    options = dict(head_dims=[64], causal=[False], lengths=[100], tokens=400, hidden=128)
    log_file = tmp_path / "candidates.jsonl"
    [result] = autotune.tune(
        "toy", **options, allow_cpu=True, progress=False, log_file=log_file, repeats=2, confirm=2
    )
    # the winner's time is its own (about 2 ms), below any other candidate's floor (6 ms)
    assert result.config == Toy(2) and 1.0 < result.ms["a"] < 5.0, result
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    confirmed = [row for row in rows if row.get("confirm")]
    assert len(rows) == 3 + 2 and len(confirmed) == 2  # every candidate, then the 2 fastest
    assert 2 in {row["config"]["a"] for row in confirmed}
    start = [row["ms"] for row in confirmed if row["config"]["a"] == 1]
    if start:  # the starting config among the finalists: its time from the same rounds
        assert result.default_ms["a"] == start[0]


@pytest.mark.parametrize("implementation", sorted(autotune.tunables()))
def test_every_candidate_config_round_trips_through_the_cache(cache_file, implementation):
    """Whatever the tuner can pick must be readable back: a config field the reader refused
    (bwd_dkdv_stages = None, JSON null) dropped every finished bucket of an H200 tuning run, as
    each merge rewrote the file without the entries it could not read."""
    plans = autotune.plan(
        implementation, head_dims=[64, 256], lengths=[1024, 16384], device="somegpu"
    )
    configs = {
        (p.bucket, config)
        for p in plans
        for candidates in p.candidates.values()
        for config in candidates
    }
    assert any(None in dataclasses.asdict(c).values() for _, c in configs) or (
        implementation != "mosaic"
    )  # the kind of field that broke is among them
    for bucket, config in configs:
        cache.merge(cache_file, [autotune.Entry(bucket, dataclasses.asdict(config))])
        assert cache.lookup_bucket(bucket) == (config, "cache"), config
    assert len(cache.load(cache_file)) == len({bucket for bucket, _ in configs})


def _log_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _shipped_h200() -> dict:
    table = next(p for p in autotune.shipped_tables() if p.name == f"{H200}.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return autotune.load(table)


# Stop 35 retuned the forward fields of these buckets after the folded scale (a change to the
# forward kernel alone): `jattn autotune --searches forward schedule`, merged by
# `benchmarks/dev/table_from_log.py --forward-only`; their backward fields are the older logs'.
# Stop 39 retuned H = 64 causal T <= 4096 again (the forward's redo on 64 x 128 score tiles): a
# later log's bucket replaces an earlier one's.
RETUNE_LOGS = (
    "autotune_mosaic_h200_h128_forward_stop35.jsonl",
    "autotune_mosaic_h200_h64_causal_forward_stop35.jsonl",
    "autotune_mosaic_h200_h64_causal_16k_forward_stop35.jsonl",  # a second call, T > 4096
    "autotune_mosaic_h200_h64_causal_forward_stop39.jsonl",
    "autotune_mosaic_h200_h128_causal_512_forward_stop40.jsonl",  # H = 128 causal T <= 1024
)


def _retuned() -> dict[str, tuple[dict, str]]:
    """{"H=128 bfloat16 causal T>4096": (config, log)}: per retuned bucket, the fastest
    candidate of the schedule search's confirmation rounds in the last log that tuned it."""
    retuned = {}
    for log in RETUNE_LOGS:
        best = {}
        for r in _log_rows(H200_LOG.with_name(log)):
            if r["search"] != "schedule" or not r.get("confirm") or r.get("ms") is None:
                continue
            name = r["bucket"].split(" ", 2)[2]
            if name not in best or r["ms"] < best[name]["ms"]:
                best[name] = r
        retuned.update({name: (r["config"], log) for name, r in best.items()})
    return retuned


# Stop 44 retuned H = 64's backward fields (`jattn autotune --searches backward`, which starts
# from the shipped config), merged by `table_from_log --backward-only`; the causal T > 4096
# bucket was cut before its confirmation rounds and kept its fields.
# H = 64's backward retunes: five buckets in stop 44's call, causal T > 4096 (cut there) in
# stop 45's, which confirmed the shipped bwd_* fields
BACKWARD_RETUNE_LOGS = (
    "autotune_mosaic_h200_h64_backward_stop44.jsonl",
    "autotune_mosaic_h200_h64_causal_16k_backward_stop45.jsonl",
)


def _backward_retuned() -> dict[str, tuple[dict, str]]:
    """{"H=64 bfloat16 full T<=1024": (row, log)}: per bucket, the backward search's fastest
    row in the confirmation rounds of the backward retunes' logs."""
    best = {}
    for log in BACKWARD_RETUNE_LOGS:
        for r in _log_rows(H200_LOG.with_name(log)):
            if r["search"] == "backward" and r.get("confirm") and r.get("ms") is not None:
                name = r["bucket"].split(" ", 2)[2]
                if name not in best or r["ms"] < best[name][0]["ms"]:
                    best[name] = (r, log)
    return best


def _with_retune(bucket, config: dict) -> dict:
    """config as the table holds it: a retuned bucket's forward fields replaced, and a
    backward-retuned bucket's bwd_* fields."""
    retune = next((c for n, (c, _) in _retuned().items() if str(bucket).endswith(n)), None)
    if retune is not None:
        forward = {k: v for k, v in retune.items() if not k.startswith(("bwd_", "redo_"))}
        config = {**config, **forward}
    backward = next(
        (r for n, (r, _) in _backward_retuned().items() if str(bucket).endswith(n)), None
    )
    if backward is not None:
        config = {**config, **{k: v for k, v in backward["config"].items() if k in config}}
    return config


def test_shipped_h200_table_holds_the_backward_retune():
    """H = 64's 6 buckets, each backward-retuned to its confirmation rounds (stops 44 and 45):
    each entry's bwd_* fields and backward time are the confirmed winner's, its forward fields
    the ones the tune started from (the log's), its source the log."""
    retuned = _backward_retuned()
    assert len(retuned) == 6 and all(n.startswith("H=64 ") for n in retuned)
    shipped = _shipped_h200()
    for name, (row, log) in retuned.items():
        (bucket,) = [b for b in shipped if str(b).endswith(name)]
        entry = shipped[bucket]
        for field, value in entry.config.items():
            assert row["config"][field] == value, (name, field)
        assert entry.ms["backward"] == pytest.approx(row["ms"], abs=1e-4)
        assert entry.measured["backward"]["source"].endswith(log)


def test_shipped_h200_table_holds_the_forward_retune():
    """The retuned buckets (stop 35): 6 at H = 128 and H = 64's 3 causal ones (T > 4096 in a
    call of its own, the first was cut before its confirmation rounds); each entry's forward
    fields are its confirmed schedule winner, its backward fields untouched."""
    retuned = _retuned()
    assert len(retuned) == 9
    shipped = _shipped_h200()
    for name, (config, log) in retuned.items():
        (bucket,) = [b for b in shipped if str(b).endswith(name)]
        entry = shipped[bucket]
        for field, value in config.items():
            if not field.startswith(("bwd_", "redo_")):  # (redo fields: None, not in the table)
                assert entry.config[field] == value, (name, field)
        assert entry.measured["forward"]["source"].endswith(log), entry.measured


def test_shipped_h200_table_holds_the_tuning_log_winners():
    """The H200 table's H = 64 entries are that tuning run's log, rebuilt per bucket (its cache
    lost the buckets, see the round-trip test): each entry is the fastest candidate of the
    bucket's last search, bwd_fused_dq left out, and every entry builds a config."""
    from benchmarks.dev import table_from_log

    rows = _log_rows(H200_LOG)
    rebuilt = table_from_log.entries(rows, H200, {"bwd_fused_dq": True}, {})
    shipped = {
        b: e
        for b, e in _shipped_h200().items()
        if b.head_dim == 64 and not (b.causal and b.lengths == ">4096")  # tuned alone, below
    }
    assert {e.bucket: _with_retune(e.bucket, e.config) for e in rebuilt} == {
        b: e.config for b, e in shipped.items()
    }
    assert len(shipped) == 5  # causal T > 4096 was cut before its backward search
    for bucket, entry in shipped.items():
        config = cache.get_tunable("mosaic").config_type(**entry.config)
        assert not config.bwd_fused_dq
        if "backward" in entry.measured:  # retuned in stop 44: the test above
            continue
        assert entry.ms["backward"] == pytest.approx(
            abs=1e-4,
            expected=min(
                r["ms"]
                for r in rows
                if r["search"] == "backward"
                and str(bucket).endswith(r["bucket"].split(" ", 2)[2])
                and not r["config"]["bwd_fused_dq"]
            ),
        )


@pytest.mark.parametrize(
    "head_dim, log, buckets",
    [
        (128, "autotune_mosaic_h200_h128.jsonl", 6),  # causal and full, three length ranges
        (256, "autotune_mosaic_h200_h256.jsonl", 6),
        (64, "autotune_mosaic_h200_h64_causal_16k.jsonl", 1),  # causal T > 4096 (stop 29)
    ],
)
def test_shipped_h200_table_holds_the_tuners_confirmed_winners(head_dim, log, buckets):
    """At H = 128 and 256 (stop 27), and H = 64 causal T > 4096 (stop 29), the table is the
    tuner's own cache of a complete run: per bucket, the backward search's fastest candidate in
    the log's confirmation rounds."""
    rows = _log_rows(H200_LOG.with_name(log))
    logged = {r["bucket"].split(" ", 2)[2] for r in rows}  # "H=64 bfloat16 causal T>4096"
    shipped = {
        b: e
        for b, e in _shipped_h200().items()
        if b.head_dim == head_dim and any(str(b).endswith(name) for name in logged)
    }
    assert len(shipped) == buckets
    for bucket, entry in shipped.items():
        confirmed = [
            r
            for r in rows
            if r["search"] == "backward"
            and r.get("confirm")
            and r.get("ms") is not None
            and str(bucket).endswith(r["bucket"].split(" ", 2)[2])
        ]
        best = min(confirmed, key=lambda r: r["ms"])
        assert entry.config == _with_retune(bucket, best["config"])
        if not any(str(bucket).endswith(n) for n in _backward_retuned()):  # (retuned: its own)
            assert entry.ms["backward"] == pytest.approx(best["ms"], abs=1e-4)
        assert not cache.get_tunable("mosaic").config_type(**entry.config).bwd_fused_dq


def test_backward_retune_merges_only_what_the_tune_started_from():
    """table_from_log --backward-only: a bucket's confirmed backward winner replaces the table
    entry's bwd_* fields and backward time, keeps its forward fields and times; a log row tuned
    from other forward fields, or for a bucket the table lacks, changes nothing."""
    from benchmarks.dev import table_from_log

    shipped = _shipped_h200()
    [bucket] = [b for b in shipped if str(b).endswith("H=128 bfloat16 full T<=4096")]
    old = shipped[bucket]
    text = "mosaic nvidia_h200 H=128 bfloat16 full T<=4096"
    won = {**old.config, "bwd_num_stages": 1, "bwd_redo_hidden": None}
    rows = [
        dict(bucket=text, search="backward", config=old.config, ms=9.0, confirm=1),
        dict(bucket=text, search="backward", config=won, ms=8.0, confirm=1),
        dict(bucket=text, search="backward", config={**won, "bwd_num_stages": 2}, ms=7.0),
    ]
    [entry] = table_from_log.backward_retune(rows, shipped, H200, {"date": "today"})
    assert entry.config == {**old.config, "bwd_num_stages": 1}  # no bwd_redo_hidden added
    assert entry.ms == {**old.ms, "backward": 8.0}
    assert entry.measured["backward"] == {"date": "today"}
    other = {**won, "block_q": old.config["block_q"] // 2}
    moved = [dict(rows[1], config=other)]
    assert table_from_log.backward_retune(moved, shipped, H200, {}) == []
    lacking = [dict(rows[1], bucket=text.replace("H=128", "H=32"))]
    assert table_from_log.backward_retune(lacking, shipped, H200, {}) == []
