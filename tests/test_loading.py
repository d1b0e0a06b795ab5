"""Loading Hugging Face checkpoint directories, and the errors for every way one can be wrong.

Each bad checkpoint must raise one `SptError` subclass whose message names the problem (the file,
the tensor, both shapes), so the CLI's one-line error is enough to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import weakref

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from spt_jax import models
from spt_jax.errors import ConfigError, WeightsError
from spt_jax.models import SUPPORTED_MODEL_TYPES, hf_checkpoint
from spt_jax.models.families import family_for
from spt_jax.models.weights import load_params


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    """Rewrite model.safetensors as ``edit(dict of arrays)`` returns it."""
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    safetensors.numpy.save_file(edit(tensors), path, metadata={"format": "pt"})


def _assert_same_params(a, b):
    leaves_a = jax.tree_util.tree_leaves_with_path(a.params)
    leaves_b = jax.tree_util.tree_leaves_with_path(b.params)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_loads_config_weights_and_tokenizer(tiny_hf_checkpoint):
    directory, torch_model = tiny_hf_checkpoint("llama")
    lm = models.load(directory)
    assert lm.config.model_type == "llama"
    assert (lm.config.n_layers, lm.config.d_model, lm.config.vocab_size) == (2, 64, 128)
    assert lm.name == str(directory)
    assert lm.load_time_s > 0  # results.json's timing starts here
    assert lm.n_params == sum(p.numel() for p in torch_model.parameters())
    assert lm.tokenizer("w5 w6 w7")["input_ids"] == [5, 6, 7]
    q = torch_model.model.layers[1].self_attn.q_proj.weight.detach().numpy()  # [H d, D]
    ours = np.asarray(lm.params["layers"]["attn"]["q_proj"][...])[1]  # [D, H, d]
    np.testing.assert_array_equal(ours.reshape(64, -1), q.T)


def test_sharded_checkpoint_loads_identically(tiny_hf_checkpoint):
    single, _ = tiny_hf_checkpoint("qwen2")
    sharded, _ = tiny_hf_checkpoint("qwen2", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    _assert_same_params(models.load(single), models.load(sharded))


def test_unsupported_model_type_lists_supported(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("llama")[0])
    _edit_config(directory, model_type="mamba")
    with pytest.raises(ConfigError) as err:
        models.load(directory)
    message = str(err.value)
    assert "'mamba' is not supported" in message and "config.json" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)
    with pytest.raises(ConfigError, match="'mamba' is not supported.*gemma3_text"):
        family_for("mamba")


def test_remote_code_is_refused(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("llama")[0])
    _edit_config(directory, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    with pytest.raises(ConfigError, match="trust_remote_code.*auto_map"):
        models.load(directory)


def test_pickle_only_checkpoint_is_refused(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("llama")[0])
    torch_model = tiny_hf_checkpoint("llama")[1]
    (directory / "model.safetensors").unlink()
    torch.save(torch_model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(WeightsError) as err:
        models.load(directory)
    message = str(err.value)
    assert "pytorch_model.bin" in message
    assert "safetensors only" in message and "model.safetensors" in message
    assert "from_pretrained" not in message  # that would unpickle the very file refused here


def test_missing_shard_is_named(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("qwen2", max_shard_size="20KB")[0])
    shards = sorted(directory.glob("*.safetensors"))
    shards[1].unlink()
    with pytest.raises(WeightsError) as err:
        models.load(directory)
    message = str(err.value)
    assert "model.safetensors.index.json" in message
    assert shards[1].name in message
    assert shards[0].name not in message


def test_truncated_safetensors_is_named(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("llama")[0])
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors.*truncated"):
        models.load(directory)


def test_wrong_shape_names_tensor_and_both_shapes(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("llama")[0])
    name = "model.layers.1.mlp.up_proj.weight"  # [d_ff 96, D 64]

    def shrink(tensors):
        tensors[name] = tensors[name][:80]
        return tensors

    _edit_tensors(directory, shrink)
    with pytest.raises(WeightsError) as err:
        models.load(directory)
    message = str(err.value)
    assert f"{name}: checkpoint shape (80, 64), expected (96, 64)" in message
    assert "1 problem(s)" in message


def test_missing_and_unexpected_tensors_reported_together(tiny_hf_checkpoint, copy_checkpoint):
    directory = copy_checkpoint(tiny_hf_checkpoint("llama")[0])

    def damage(tensors):
        del tensors["model.layers.0.self_attn.k_proj.weight"]
        del tensors["model.norm.weight"]
        tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
        tensors["model.layers.7.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"]
        return tensors

    _edit_tensors(directory, damage)
    with pytest.raises(WeightsError) as err:
        models.load(directory)
    message = str(err.value)
    assert "4 problem(s)" in message
    assert "missing: layers.attn.k_proj (layers 0)" in message
    assert "missing: final_norm.scale" in message
    assert "unexpected: model.layers.0.mlp.extra_proj.weight" in message
    assert "unexpected: model.layers.7.mlp.up_proj.weight (layer 7 >= n_layers 2)" in message


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError) as err:
        models.load("smollm2-135m-instuct")
    message = str(err.value)
    assert "'smollm2-135m-instuct' is neither an embedded model" in message
    assert "did you mean 'smollm2-135m-instruct'" in message


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        models.load(tmp_path)


def test_bad_dtype_is_refused(tiny_hf_checkpoint):
    with pytest.raises(ConfigError, match="dtype 'float64' is not supported.*bfloat16"):
        models.load(tiny_hf_checkpoint("llama")[0], dtype="float64")


def test_tensors_stream_one_at_a_time(tiny_hf_checkpoint):
    """The loader drops each stacked-layer tensor before it asks for the next one.

    So peak host memory is the model's own buffers plus one source tensor, not a second copy of
    the checkpoint. An unstacked tensor (embedding, final norm) already in the target dtype is
    placed as it is, so it may live on as that parameter's storage (a zero-copy placement on CPU),
    which is still one copy.
    """
    directory, _ = tiny_hf_checkpoint("gemma2")
    files = hf_checkpoint.safetensors_files(directory)
    alive, pulled = [], []

    def watched():
        for name, array in hf_checkpoint.iter_safetensors(files):
            # An array that owns its memory: any view the loader keeps would keep it alive.
            array = np.array(array, copy=True)
            # Every tensor handed out before this one must be garbage by now.
            alive.append([n for n, ref in pulled if ref() is not None and "layers." in n])
            pulled.append((name, weakref.ref(array)))
            yield name, array
            del array

    lm = models.load(directory)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm.params)
    params = load_params(
        abstract_state,
        family_for(lm.config.model_type),
        watched(),
        source=str(directory),
        n_layers=lm.config.n_layers,
    )
    assert len(pulled) == len(safetensors.numpy.load_file(files[0]))
    assert alive == [[]] * len(pulled)
    _assert_same_params(lm, dataclasses.replace(lm, params=params))
