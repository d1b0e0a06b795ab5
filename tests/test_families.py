"""Each family's tables, checked against the parameters its models really have.

Every parameter of every variant in conftest must match exactly one of its family's sharding rules
(replicated ones by an explicit rule), a parameter no rule names must raise, the GGUF tables must
point at the family's own model types, and a GGUF load must parse its header and build its config
once.
"""

from __future__ import annotations

import dataclasses
import re

import gguf
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as Spec

from conftest import VARIANTS, variant_configs
from spt_jax import models
from spt_jax.models import gguf_header, gguf_io
from spt_jax.models.families import (
    ANY_FAMILY_SHARDINGS,
    FAMILIES,
    GGUF_ARCHITECTURES,
    LLAMA,
    REPLICATED,
    ShardRule,
    config_from_hf,
    family_for,
)
from spt_jax.models.transformer import DecoderLM
from spt_jax.tune import mesh as mesh_lib
from spt_jax.tune.mesh import ShardingRuleError, make_mesh, param_shardings, shard_rule, spec_for


def abstract_params(variant: str):
    config = config_from_hf(variant_configs()[variant]())
    _, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    return config, state


def param_names(state) -> list[str]:
    return [
        ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for path, _ in jax.tree_util.tree_leaves_with_path(state)
    ]


def one_device_mesh():
    return make_mesh(1, 1, devices=jax.devices()[:1])


# ------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_matches_exactly_one_sharding_rule(variant):
    config, state = abstract_params(variant)
    family = family_for(config.model_type)
    names = param_names(state)
    assert "embed_tokens" in names and "layers.attn.q_proj" in names
    for name in names:
        own = [r for r in family.shardings if re.fullmatch(r.pattern, name)]
        assert len(own) == 1, (name, family.name, own)
        assert shard_rule(name, family) is own[0]
        assert shard_rule(name) == own[0]  # every family's rules together agree
    # the loader's and the tuner's entry point: no parameter is left without a rule
    shardings = param_shardings(state, one_device_mesh(), config)
    assert all(s.spec == Spec() for s in jax.tree.leaves(shardings))  # one device: all replicated


@pytest.mark.parametrize("variant", VARIANTS)
def test_family_rules_and_any_family_rules_give_the_same_specs(variant):
    config, state = abstract_params(variant)
    family = family_for(config.model_type)
    for name, leaf in zip(param_names(state), jax.tree.leaves(state)):
        for model_size in (2, 4):
            ours = spec_for(name, tuple(leaf.shape), model_size, family)
            assert ours == spec_for(name, tuple(leaf.shape), model_size), name


def test_projections_split_and_norms_replicate_by_rule():
    _, state = abstract_params("llama_attn_bias")  # D=64, 4 heads, 2 kv heads, d_ff 96
    specs = {n: spec_for(n, tuple(leaf.shape), 2, LLAMA)
             for n, leaf in zip(param_names(state), jax.tree.leaves(state))}  # fmt: skip
    assert specs["layers.attn.q_proj"] == Spec(None, None, "model", None)
    assert specs["layers.attn.q_bias"] == Spec(None, "model", None)
    assert specs["layers.attn.o_proj"] == Spec(None, "model", None, None)
    assert specs["layers.mlp.gate_proj"] == Spec(None, None, "model")
    assert specs["layers.mlp.down_proj"] == Spec(None, "model", None)
    assert specs["embed_tokens"] == Spec("model", None)
    for replicated in ("layers.attn.o_bias", "layers.mlp.down_bias", "layers.attn_norm.scale", "final_norm.scale"):
        assert specs[replicated] == Spec(), replicated
    # an axis that does not divide by the model axis size falls back to replicated, by design
    assert spec_for("layers.attn.k_proj", (2, 64, 3, 16), 2, LLAMA) == Spec()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_unknown_or_renamed_parameter_raises_naming_it_and_the_family(family):
    with pytest.raises(ShardingRuleError, match=rf"'layers\.attn\.q_projection'.*family '{family.name}'"):
        spec_for("layers.attn.q_projection", (2, 64, 4, 16), 2, family)
    with pytest.raises(ShardingRuleError, match="'layers.attn.q_projection'.*any family"):
        spec_for("layers.attn.q_projection", (2, 64, 4, 16), 2)


def test_a_parameter_of_another_family_raises():
    with pytest.raises(ShardingRuleError, match="'pos_embed'.*family 'llama'"):
        shard_rule("pos_embed", LLAMA)  # GPT-2's learned positions: no Llama model has them
    assert shard_rule("pos_embed").axes == REPLICATED


def test_renamed_parameter_in_a_state_raises():
    config, state = abstract_params("llama")
    pure = nnx.to_pure_dict(state)
    pure["final_layernorm"] = pure.pop("final_norm")
    with pytest.raises(ShardingRuleError, match="'final_layernorm.scale'.*family 'llama'"):
        param_shardings(pure, one_device_mesh(), config)


def test_two_matching_rules_raise(monkeypatch):
    config, state = abstract_params("llama")
    doubled = dataclasses.replace(
        LLAMA, shardings=LLAMA.shardings + (ShardRule(r"layers\.attn\.q_proj", REPLICATED),)
    )
    monkeypatch.setattr(mesh_lib, "family_for", lambda model_type: doubled)
    with pytest.raises(ShardingRuleError, match=r"'layers\.attn\.q_proj' matches 2 sharding rules of family 'llama'"):
        param_shardings(state, one_device_mesh(), config)


def test_any_family_rules_are_disjoint():
    """Families share rule objects, so the union holds each once and no two distinct ones overlap."""
    patterns = [r.pattern for r in ANY_FAMILY_SHARDINGS]
    assert len(patterns) == len(set(patterns))


# ---------------------------------------------------------------------------------------- gguf


def test_gguf_tables_belong_to_their_family():
    total = 0
    for family in FAMILIES:
        for arch in family.gguf:
            total += 1
            assert arch.name in gguf.MODEL_ARCH_NAMES.values(), arch.name
            assert arch.model_type in family.model_types, (family.name, arch.name)
            assert all(t in family.model_types for _, t in arch.model_type_by_name), arch.name
            assert all(fix.fix in gguf_io._FIXES for fix in arch.fixes), arch.name
            assert arch.global_modules and arch.layer_modules, arch.name
    assert len(GGUF_ARCHITECTURES) == total  # no architecture claimed by two families
    assert gguf_io.SUPPORTED_ARCHITECTURES == ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2")


def test_gguf_load_parses_header_once_and_builds_config_once(tmp_path, monkeypatch):
    from test_gguf import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny-llama.gguf")
    calls = {"header": 0, "hf_config": 0, "model_config": 0}

    def counting(key, function):
        def spy(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)

        return spy

    monkeypatch.setattr(gguf_header, "_parse_header", counting("header", gguf_header._parse_header))
    monkeypatch.setattr(gguf_io, "_config_from_header", counting("hf_config", gguf_io._config_from_header))
    monkeypatch.setattr(models, "config_from_hf", counting("model_config", models.config_from_hf))
    lm = models.load(path)
    assert calls == {"header": 1, "hf_config": 1, "model_config": 1}
    assert lm.config.n_layers == 2 and lm.tokenizer.decode(lm.tokenizer("hello world")["input_ids"]) == "hello world"

    # the shared header serves config, tensors and tokenizer without another parse or config build
    header = gguf_header.read_gguf_header(path)
    assert gguf_io.read_gguf_config(header) is gguf_io.read_gguf_config(header)
    sum(1 for _ in gguf_io.iter_gguf_tensors(header))
    gguf_io.load_gguf_tokenizer(header)
    assert calls == {"header": 2, "hf_config": 2, "model_config": 1}
