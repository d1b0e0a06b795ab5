"""The whole protocol on a mesh and across hosts: generation, scoring, tuning and `evaluate` sharded
over fake CPU devices give the single-device results, and a two-process job writes its results once.

The device count is fixed when jax starts, so the sharded checks run in fresh interpreters (this file
is also the worker script: ``python test_mesh_eval.py mesh8|host ...``), as in test_tune_sharded.py.
One process with 8 CPU devices runs generation and scoring on the meshes 8x1, 4x2, 2x4 and 1x8 (JAX's
own ``jax.make_mesh``, explicit axes, and the library's Auto ones; models placed on the mesh or not),
`evaluate` end to end on the same four meshes against a one-device run, tuning on an explicit-axis
mesh, the bad meshes, the weight loader's streaming, and ``spt-jax run --mesh data=4,model=2``. Two
processes with 4 devices each (gloo) then run that same command with ``--distributed`` and must
produce the same results, written by process 0 alone.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tune_support import PYTHON, subprocess_env  # noqa: E402
from tune_support import save_tiny_llama as _save_tiny_llama  # noqa: E402

TIMEOUT_S = 400
SHAPES = ((8, 1), (4, 2), (2, 4), (1, 8))
# The command both the 8-device run and the two-process run execute (batch sizes divide data=4).
CLI_ARGS = ["--n-test", "4", "--k", "1", "--steps", "2", "--tune-batch-size", "4", "--prompt-length", "2",
            "--eval-every", "2", "--n-curve", "4", "--batch-size", "4", "--quiet", "--mesh", "data=4,model=2"]


def save_tiny_llama(directory: Path) -> None:
    _save_tiny_llama(directory, max_position_embeddings=512, tie_word_embeddings=False)  # tied: it echoes "\n"


def eval_config(mesh):
    from spt_jax.evaluate import EvalConfig
    from spt_jax.tune import TuneConfig

    tune = TuneConfig(steps=2, batch_size=8, prompt_length=2, learning_rate=0.05, checkpoint_every=0)
    # zero-shot and the log-likelihood reference run in the command-line checks; here the modes with a
    # shared prefix (demonstrations, a tuned prompt)
    return EvalConfig(modes=("few_shot", "soft_prompt"), n_test=8, k=1, tune=tune, eval_every=0, batch_size=8,
                      loglik=False, mesh=mesh)


def comparable(results: dict, run_dir: Path) -> dict:
    """What must not depend on the mesh: every row's numbers, every output, the tuning trajectory."""
    rows = [{key: value for key, value in row.items() if not key.endswith("time_s")} for row in results["results"]]
    tuning = results.get("tuning") or {}
    outputs = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return {"rows": rows, "curve": tuning.get("curve"), "losses": [h["loss"] for h in tuning.get("history", [])],
            "outputs": [(p["mode"], p["index"], p["output"]) for p in outputs]}


# ---------------------------------------------------------------- workers (run in subprocesses)


def worker_mesh8(model_dir: str, task_file: str, out: str) -> None:
    import dataclasses

    import jax

    from spt_jax import cli, models, tune
    from spt_jax import evaluate as ev
    from spt_jax.generate import GenerationConfig, generate
    from spt_jax.scoring import choice_loglikelihoods, item_choice_loglikelihoods, score_continuations
    from spt_jax.tasks import get_task
    from spt_jax.prefix import batch_cache, prefix_cache
    from spt_jax.tune.mesh import mesh_from_spec, on_mesh
    from test_generate import TEXTS, tiny_lm

    assert jax.device_count() == 8
    report: dict = {}

    # -- generation and scoring: one device vs each mesh shape ------------------------------------
    lm = tiny_lm()
    texts = TEXTS[:5] + [t[::-1] for t in TEXTS[:4]]  # 9 texts in batches of 8: a partial last batch
    soft = np.random.default_rng(0).normal(0.0, 1.0, (3, lm.config.d_model)).astype(np.float32)
    gen_config = GenerationConfig(max_new_tokens=6, batch_size=8)
    pairs = [("the cat", " sat"), ("a", " b c"), ("why", " not?"), ("ok", " then"), ("", " xyz")] * 2
    choices = [("q: ", [" yes", " no", " maybe"]), ("the answer is", [" a", " b"])]
    items = [[("the cat", " sat"), ("the cat", " ran")]]

    def run_all(mesh, model=lm, scoring=True):
        out = {"generated": generate(model, texts, soft_prompt=soft, prefix_text="q: a\nok\n", config=gen_config,
                                     mesh=mesh)}
        if scoring:
            scored = score_continuations(model, *zip(*pairs), soft_prompt=soft, batch_size=8, mesh=mesh)
            out.update(scores=scored.loglikelihood.tolist(), greedy=scored.is_greedy.tolist(),
                       choices=[s.tolist() for s in choice_loglikelihoods(model, choices, batch_size=8, mesh=mesh)],
                       items=[s.tolist() for s in item_choice_loglikelihoods(model, items, mesh=mesh)])
        return out

    report["single"] = run_all(None)
    report["sweep"] = {}
    for data, model_size in SHAPES:
        explicit = jax.make_mesh((data, model_size), ("data", "model"))  # JAX's default: explicit axes
        report["sweep"][f"{data}x{model_size}"] = run_all(explicit)
    # the library's Auto mesh, on a model whose weights already sit on it (no copy is made)
    auto = tune.make_mesh(data=4, model=2)
    placed = dataclasses.replace(lm, params=tune.place_params(lm.params, auto, lm.config))
    report["placed"] = run_all(auto, placed, scoring=False)
    report["placed_is_same_buffers"] = all(
        a is b for a, b in zip(jax.tree.leaves(tune.mesh.placed_params(placed, auto)), jax.tree.leaves(placed.params))
    )
    # inside a caller's own explicit-axis mesh context
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "model"))):
        report["in_context"] = run_all(jax.make_mesh((4, 2), ("data", "model")), scoring=False)

    # the same call again compiles nothing (an equal mesh, made anew, finds its compilation)
    before = lm.compiled.compilations()
    run_all(jax.make_mesh((4, 2), ("data", "model")))
    report["recompiled_same_mesh"] = lm.compiled.compilations() - before

    # the batch's KV cache as generation and scoring build it on a mesh (`OnMesh.kv_shardings`)
    report["kv_specs"] = {}
    for data, model_size in ((4, 2), (2, 4)):
        on = on_mesh(lm, jax.make_mesh((data, model_size), ("data", "model")), 8, "batch")
        kv = prefix_cache(lm, soft, "q: ", mesh=on.mesh, params=on.params).kv
        with on.context():
            cache = jax.jit(lambda kv: batch_cache(lm.config, kv, 8, 16, lm.dtype, on.kv_shardings(lm.config)))(kv)
        report["kv_specs"][f"{data}x{model_size}"] = [
            [str(a) for a in (*x.sharding.spec, *[None] * (x.ndim - len(x.sharding.spec)))] for x in (cache.k, cache.pos)
        ]

    # -- bad meshes ---------------------------------------------------------------------------------
    errors = {}

    def error_of(name, fn):
        try:
            fn()
            errors[name] = None
        except Exception as e:  # noqa: BLE001 -- the test says which kind it must be
            errors[name] = f"{type(e).__name__}: {e}"

    mesh42 = jax.make_mesh((4, 2), ("data", "model"))
    error_of("generate_batch", lambda: generate(lm, texts, config=GenerationConfig(batch_size=6), mesh=mesh42))
    error_of("score_batch", lambda: score_continuations(lm, ["a"], [" b"], batch_size=6, mesh=mesh42))
    error_of("axes", lambda: generate(lm, texts, config=gen_config, mesh=jax.make_mesh((4, 2), ("batch", "model"))))
    error_of("devices", lambda: mesh_from_spec("data=3,model=2"))
    error_of("eval_batch", lambda: eval_config("data=8,model=1").replace(batch_size=4).device_mesh())
    error_of("tune_batch", lambda: tune.tune(lm, [("a", " b")] * 8, tune.TuneConfig(batch_size=6, steps=1),
                                             mesh=mesh42, progress=False))
    report["errors"] = errors

    # -- tuning on JAX's own explicit-axis mesh, a plainly loaded model ------------------------------
    from tune_support import arithmetic_examples, tiny_lm as tune_lm

    examples, tune_config = arithmetic_examples(16), tune.TuneConfig(prompt_length=2, batch_size=8, steps=2,
                                                                     learning_rate=0.05)
    single = tune.tune(tune_lm(), examples, tune_config, mesh=tune.make_mesh(1, 1, devices=jax.devices()[:1]),
                       progress=False)
    report["tune"] = {"single": np.asarray(single.prompt).tolist()}
    try:
        explicit = tune.tune(tune_lm(), examples, tune_config, mesh=jax.make_mesh((8, 1), ("data", "model")),
                             progress=False)
        report["tune"]["explicit"] = np.asarray(explicit.prompt).tolist()
    except Exception as e:  # noqa: BLE001 -- reported, so the other checks still run
        report["tune"]["explicit"] = f"{type(e).__name__}: {e}"

    # -- the loader streams each layer onto the mesh: no stacked [L, ...] buffer on the host ---------
    from spt_jax.models import weights

    allocated = []
    real_empty = np.empty

    def recording_empty(shape, *args, **kwargs):
        allocated.append(tuple(np.atleast_1d(shape)))
        return real_empty(shape, *args, **kwargs)

    weights.np.empty = recording_empty
    try:
        plain = models.load(model_dir)
        stacked_plain = list(allocated)
        allocated.clear()
        onto = tune.make_mesh(data=4, model=2)
        sharded = models.load(model_dir, shardings=lambda s: tune.param_shardings(s, onto))
        stacked_sharded = list(allocated)
    finally:
        weights.np.empty = real_empty
    n_layers = plain.config.n_layers
    report["loader"] = {
        "host_stacked_plain": sum(1 for s in stacked_plain if s[0] == n_layers),
        "host_stacked_sharded": sum(1 for s in stacked_sharded if s[0] == n_layers),
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params))),
        "q_spec": [str(a) for a in sharded.params["layers"]["attn"]["q_proj"][...].sharding.spec],
    }

    # -- evaluate end to end: one device vs the four meshes (plain and sharded loads) ----------------
    task = get_task(task_file)
    folder = Path(out).parent / "eval_single"  # mesh None: generation on one device, unsharded
    report["eval_single"] = comparable(ev.evaluate(plain, task, eval_config(None), folder, progress=False), folder)
    report["eval_sweep"] = {}
    for data, model_size in SHAPES:
        if model_size == 1:  # a plain model, JAX's own explicit mesh
            mesh, lm_here = jax.make_mesh((data, model_size), ("data", "model")), plain
        else:  # a model loaded onto the mesh, the mesh named by its spec string
            mesh = f"data={data},model={model_size}"
            grid = mesh_from_spec(mesh)
            lm_here = models.load(model_dir, shardings=lambda s, grid=grid: tune.param_shardings(s, grid))
        folder = Path(out).parent / f"eval_{data}x{model_size}"
        results = ev.evaluate(lm_here, task, eval_config(mesh), folder, progress=False)
        report["eval_sweep"][f"{data}x{model_size}"] = comparable(results, folder)
        report.setdefault("eval_mesh_recorded", []).append(results["config"]["mesh"])

    # -- the command line on 8 devices --------------------------------------------------------------
    cli_out = Path(out).parent / "cli8"
    report["cli_status"] = cli.main(["run", "--model", model_dir, "--task", task_file, "--out", str(cli_out),
                                     "--name", "run", *CLI_ARGS])
    Path(out).write_text(json.dumps(report))


def worker_host(model_dir: str, task_file: str, out_parent: str, port: str, process_id: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from spt_jax import cli

    status = cli.main(["run", "--model", model_dir, "--task", task_file, "--out", str(Path(out_parent) / process_id),
                       "--name", "run", "--distributed", f"127.0.0.1:{port},2,{process_id}", *CLI_ARGS])
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    assert status == 0, status
    jax.distributed.shutdown()


# ---------------------------------------------------------------- tests (run by pytest)


# XLA's CPU compiler without its slow LLVM passes: these workers compile ~60 small programs (every mesh
# compiles its own), and both sides of every comparison run under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_worker(args: list[str], n_devices: int) -> subprocess.Popen:
    env = subprocess_env(n_devices)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {FAST_COMPILE}"
    return subprocess.Popen([PYTHON, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_cli import write_task

    directory = tmp_path_factory.mktemp("mesh_eval")
    (directory / "model").mkdir()
    save_tiny_llama(directory / "model")
    (directory / "task").mkdir()
    return {"model": directory / "model", "task": write_task(directory / "task"), "root": directory}


@pytest.fixture(scope="module")
def mesh8(files):
    out = files["root"] / "mesh8" / "report.json"
    out.parent.mkdir()
    finish(run_worker(["mesh8", str(files["model"]), str(files["task"]), str(out)], 8))
    return json.loads(out.read_text())


def test_generation_on_every_mesh_gives_the_single_device_tokens(mesh8):
    single = mesh8["single"]["generated"]
    assert len(set(single)) > 3  # the model says different things to different inputs
    runs = {**mesh8["sweep"], "4x2 placed": mesh8["placed"], "4x2 in an explicit context": mesh8["in_context"]}
    for shape, run in runs.items():
        assert run["generated"] == single, shape


def test_scoring_on_every_mesh_matches_a_single_device(mesh8):
    single = mesh8["single"]
    for shape, run in mesh8["sweep"].items():
        np.testing.assert_allclose(run["scores"], single["scores"], rtol=1e-5, err_msg=shape)
        assert run["greedy"] == single["greedy"], shape
        for got, want in zip(run["choices"], single["choices"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=shape)
        for got, want in zip(run["items"], single["items"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=shape)


def test_sharded_calls_reuse_their_compilations_and_placed_weights(mesh8):
    assert mesh8["recompiled_same_mesh"] == 0
    assert mesh8["placed_is_same_buffers"]


def test_the_kv_cache_splits_over_rows_and_the_heads_that_divide(mesh8):
    # the tiny model has 2 kv heads: split over model=2, whole over model=4
    assert mesh8["kv_specs"]["4x2"] == [["None", "data", "None", "model", "None"], ["data", "None"]]
    assert mesh8["kv_specs"]["2x4"] == [["None", "data", "None", "None", "None"], ["data", "None"]]


def test_bad_meshes_are_config_errors(mesh8):
    errors = mesh8["errors"]
    assert all(e is not None and e.startswith("ConfigError: ") for e in errors.values()), errors
    assert "GenerationConfig.batch_size=6 does not divide over the mesh's data axis of size 4" in errors["generate_batch"]
    assert "batch_size=6 does not divide over the mesh's data axis of size 4" in errors["score_batch"]
    assert "needs exactly the axes ('data', 'model')" in errors["axes"]
    assert "needs 6 devices, found 8" in errors["devices"]
    assert "EvalConfig.batch_size=4 does not divide over the mesh's data axis of size 8" in errors["eval_batch"]
    assert "TuneConfig.batch_size=6 does not divide" in errors["tune_batch"]


def test_tuning_takes_jax_make_mesh_and_a_plainly_loaded_model(mesh8):
    np.testing.assert_allclose(mesh8["tune"]["explicit"], mesh8["tune"]["single"], atol=1e-5)


def test_the_loader_streams_layers_onto_the_mesh(mesh8):
    loader = mesh8["loader"]
    assert loader["host_stacked_plain"] > 0  # a plain load stages stacked parameters on the host
    assert loader["host_stacked_sharded"] == 0  # a sharded load never does
    assert loader["equal"]
    assert loader["q_spec"] == ["None", "None", "model", "None"]


def test_evaluate_on_every_mesh_matches_a_single_device(mesh8):
    single = mesh8["eval_single"]
    assert [r["mode"] for r in single["rows"]] == ["few_shot", "soft_prompt"]
    assert len(single["losses"]) == 2
    assert len({output for mode, _, output in single["outputs"] if mode != "loglik"}) > 3
    for shape, run in mesh8["eval_sweep"].items():
        assert run["outputs"] == single["outputs"], shape  # every output of every mode
        assert run["rows"] == single["rows"], shape  # every metric and count of every mode
        np.testing.assert_allclose(run["losses"], single["losses"], rtol=1e-5, err_msg=shape)
    assert mesh8["eval_mesh_recorded"] == ["data=8,model=1", "data=4,model=2", "data=2,model=4", "data=1,model=8"]


def test_cli_runs_on_a_mesh_of_8_fake_devices(mesh8, files):
    assert mesh8["cli_status"] == 0
    run_dir = files["root"] / "mesh8" / "cli8" / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["mesh"] == "data=4,model=2"
    assert results["tuning"]["metadata"]["mesh"] == {"data": 4, "model": 2}
    assert len(results["tuning"]["curve"]) == 2  # steps 0 and 2, generated on the mesh during tuning


def test_two_processes_give_the_single_process_results_and_write_once(mesh8, files, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = ["host", str(files["model"]), str(files["task"]), str(tmp_path), port]
    procs = [run_worker([*args, str(i)], 4) for i in (0, 1)]
    for proc in procs:
        finish(proc)
    assert not (tmp_path / "1").exists()  # process 1 wrote nothing, not even a folder
    single_dir, multi_dir = files["root"] / "mesh8" / "cli8" / "run", tmp_path / "0" / "run"
    results = json.loads((multi_dir / "results.json").read_text())
    assert results["tuning"]["metadata"]["process_count"] == 2
    multi = comparable(results, multi_dir)
    single = comparable(json.loads((single_dir / "results.json").read_text()), single_dir)
    assert multi["outputs"] == single["outputs"]
    assert multi["rows"] == single["rows"]
    assert multi["curve"] == single["curve"]
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)


# ---------------------------------------------------------------- in-process checks (no fake devices)


def test_mesh_settings_are_checked_where_they_are_given():
    import jax

    from spt_jax import cli
    from spt_jax.errors import ConfigError
    from spt_jax.evaluate import EvalConfig
    from spt_jax.tune.mesh import as_mesh, parse_mesh_spec

    assert parse_mesh_spec(" Data=4, model=2 ") == "data=4,model=2"
    assert parse_mesh_spec("model=2") == "model=2"
    assert parse_mesh_spec("auto") == "auto" and parse_mesh_spec("none") is None
    assert EvalConfig().mesh == "auto" and EvalConfig().dtype == "auto"
    for bad in ("data=0", "rows=2", "data=2,data=2", "data=two", "8x1"):
        with pytest.raises(ConfigError, match="is not 'data=N,model=M'"):
            EvalConfig(mesh=bad)
    with pytest.raises(ConfigError, match="needs exactly the axes"):
        as_mesh(jax.make_mesh((1, 1), ("batch", "model")))
    with pytest.raises(ConfigError, match="must be a jax.sharding.Mesh"):
        as_mesh("data=1")
    explicit = jax.make_mesh((1, 1), ("data", "model"))
    assert all(str(t) == "AxisType.Auto" or "Auto" in str(t) for t in as_mesh(explicit).axis_types)
    assert EvalConfig(mesh=explicit).to_dict()["mesh"] == "data=1,model=1"
    assert cli.main(["run", "--mesh", "data=x"]) == 2
    assert cli.main(["run", "--distributed", "nowhere"]) == 2


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_elsewhere(monkeypatch):
    import jax

    from spt_jax.models import resolve_dtype_name

    assert resolve_dtype_name("auto") == "float32"  # these tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_dtype_name("auto") == "bfloat16"
    assert resolve_dtype_name("float16") == "float16"


if __name__ == "__main__":
    {"mesh8": worker_mesh8, "host": worker_host}[sys.argv[1]](*sys.argv[2:])
