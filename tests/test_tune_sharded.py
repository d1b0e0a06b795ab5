"""Tuning on a fake 8-device mesh and across two processes (multi-host), each in subprocesses.

The device count is fixed when jax starts, so every check here runs in a fresh interpreter: this
file is also the worker script (``python test_tune_sharded.py mesh8|host ...``). One process with 8
CPU devices checks the sharding rules as the loader applies them and compares runs on the meshes
8x1, 4x2, 2x4 and 1x8 with a single-device run; then two processes with 4 devices each (gloo collectives) run the same
tuning as one 8-device job, with checkpoints and a resume, and must reach the same prompt.
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
from tune_support import PYTHON, arithmetic_examples, save_tiny_llama, subprocess_env  # noqa: E402

TIMEOUT_S = 300


def tune_config():
    from spt_jax.tune import TuneConfig

    return TuneConfig(prompt_length=4, batch_size=4, steps=4, learning_rate=0.05, checkpoint_every=2,
                      init="text", init_text="calc")




# ---------------------------------------------------------------- workers (run in subprocesses)


def worker_mesh8(model_dir: str, out: str) -> None:
    import jax
    from jax.sharding import PartitionSpec as Spec

    from spt_jax import models, tune
    from spt_jax.errors import ConfigError

    assert jax.device_count() == 8
    mesh = tune.make_mesh(data=4, model=2)
    lm = models.load(model_dir, shardings=lambda s: tune.param_shardings(s, mesh))
    specs = {
        "q_proj": lm.params["layers"]["attn"]["q_proj"][...].sharding.spec,
        "k_proj": lm.params["layers"]["attn"]["k_proj"][...].sharding.spec,
        "o_proj": lm.params["layers"]["attn"]["o_proj"][...].sharding.spec,
        "up_proj": lm.params["layers"]["mlp"]["up_proj"][...].sharding.spec,
        "down_proj": lm.params["layers"]["mlp"]["down_proj"][...].sharding.spec,
        "embed_tokens": lm.params["embed_tokens"][...].sharding.spec,
        "final_norm": lm.params["final_norm"]["scale"][...].sharding.spec,
    }
    assert specs == {
        "q_proj": Spec(None, None, "model", None),
        "k_proj": Spec(None, None, "model", None),
        "o_proj": Spec(None, "model", None, None),
        "up_proj": Spec(None, None, "model"),
        "down_proj": Spec(None, "model", None),
        "embed_tokens": Spec("model", None),
        "final_norm": Spec(),
    }, specs
    q = lm.params["layers"]["attn"]["q_proj"][...]
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 8)  # half the heads per device

    examples, config = arithmetic_examples(20), tune_config()
    before = [np.array(x) for x in jax.tree.leaves(lm.params)]
    sharded = tune.tune(lm, examples, config, mesh=mesh, progress=False)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(lm.params)))
    assert sharded.metadata["mesh"] == {"data": 4, "model": 2}

    one = tune.make_mesh(1, 1, devices=jax.devices()[:1])
    local = models.load(model_dir, shardings=lambda s: tune.param_shardings(s, one))
    single = tune.tune(local, examples, config, mesh=one, progress=False)

    step = tune.make_train_step(lm, config, mesh)
    assert step.compilations == 1  # one batch shape, one compilation
    # rows split over the data axis run whole; one device packs their shared prefix in front of them
    assert not tune.step.packs_prefix(mesh) and tune.step.packs_prefix(one) and tune.step.packs_prefix(None)
    assert sharded.metadata["compilations"] == len(sharded.metadata["batch_shapes_used"]) == 1
    assert single.metadata["compilations"] == tune.make_train_step(local, config, one).compilations == 1
    try:
        tune.tune(lm, examples, config.replace(batch_size=6), mesh=mesh, progress=False)
        raise AssertionError("batch 6 over a data axis of 4 was accepted")
    except ConfigError as e:
        assert "does not divide over the mesh's data axis of size 4" in str(e)
    # Every mesh shape of 8 devices gives the single-device trajectory (batch 8 divides each data axis;
    # a model axis wider than the 4 heads falls back to replicated weights, by rule).
    sweep_config = config.replace(batch_size=8)
    shapes = ((8, 1), (4, 2), (2, 4), (1, 8))
    sweep = []
    for data, model in shapes:
        grid = tune.make_mesh(data=data, model=model)
        lm_grid = models.load(model_dir, shardings=lambda s, grid=grid: tune.param_shardings(s, grid))
        run = tune.tune(lm_grid, examples, sweep_config, mesh=grid, progress=False)
        assert run.metadata["mesh"] == {"data": data, "model": model}
        assert run.metadata["compilations"] == len(run.metadata["batch_shapes_used"])  # a fresh model each
        sweep.append([h["loss"] for h in run.history])
    reference = tune.tune(local, examples, sweep_config, mesh=one, progress=False)
    np.savez(out, sharded=np.asarray(sharded.prompt), single=np.asarray(single.prompt),
             sharded_loss=[h["loss"] for h in sharded.history],
             single_loss=[h["loss"] for h in single.history],
             sweep_loss=np.array(sweep), sweep_reference=[h["loss"] for h in reference.history])


def worker_host(model_dir: str, out: str, port: str, process_id: str, checkpoint_dir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(process_id)
    )
    from spt_jax import models, tune

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = tune.make_mesh(data=4, model=2)
    lm = models.load(model_dir, shardings=lambda s: tune.param_shardings(s, mesh))
    examples, config = arithmetic_examples(20), tune_config()
    first = tune.tune(lm, examples, config, mesh=mesh, checkpoint_dir=checkpoint_dir, progress=False)
    resumed = tune.tune(lm, examples, config.replace(steps=6), mesh=mesh, checkpoint_dir=checkpoint_dir,
                        progress=False)
    assert resumed.metadata["resumed_from_step"] == 4 and resumed.metadata["process_count"] == 2
    if jax.process_index() == 0:
        np.savez(out, first=np.asarray(first.prompt), resumed=np.asarray(resumed.prompt),
                 loss=[h["loss"] for h in first.history])
    jax.distributed.shutdown()


# ---------------------------------------------------------------- tests (run by pytest)


def run_worker(args: list[str], n_devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, __file__, *args], env=subprocess_env(n_devices),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(directory)
    return directory


@pytest.fixture(scope="module")
def mesh8(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh8") / "result.npz"
    finish(run_worker(["mesh8", str(model_dir), str(out)], 8))
    return np.load(out)


def test_sharded_mesh_matches_a_single_device(mesh8):
    np.testing.assert_allclose(mesh8["sharded_loss"], mesh8["single_loss"], rtol=1e-5)
    np.testing.assert_allclose(mesh8["sharded"], mesh8["single"], atol=1e-5)


def test_every_mesh_shape_matches_a_single_device(mesh8):
    assert mesh8["sweep_loss"].shape[0] == 4  # meshes 8x1, 4x2, 2x4, 1x8
    for losses in mesh8["sweep_loss"]:
        np.testing.assert_allclose(losses, mesh8["sweep_reference"], rtol=1e-5)


def test_two_processes_match_one_and_resume_from_their_checkpoint(model_dir, mesh8, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    out, checkpoints = tmp_path / "result.npz", tmp_path / "checkpoints"
    args = ["host", str(model_dir), str(out), port]
    procs = [run_worker([*args, str(i), str(checkpoints)], 4) for i in (0, 1)]
    for proc in procs:
        finish(proc)
    result = np.load(out)
    np.testing.assert_allclose(result["first"], mesh8["sharded"], atol=1e-5)
    assert not np.allclose(result["resumed"], result["first"])
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]
    meta = json.loads((checkpoints / "6" / "meta" / "metadata").read_text())
    assert meta["step"] == 6 and meta["data_state"]["next_index"] == 6 * 4


if __name__ == "__main__":
    {"mesh8": worker_mesh8, "host": worker_host}[sys.argv[1]](*sys.argv[2:])
