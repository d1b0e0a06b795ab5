"""The pre-training recipes and the study's scale, as frozen dataclasses.

A recipe is what a lab would choose early: how the biographies are written (paraphrases, sentence
order, names or pronouns), how much QA text is mixed in, the model's width and depth and how long it
trains. The recipes differ in how *extractable* the stored knowledge is (Allen-Zhu & Li, Physics of
LMs 3.1: ~10% QA accuracy for one fixed biography per person, >90% with five permuted paraphrases
and full names), so the post-trained models' true ranking is known to spread. The `Scale` sizes the
world, the training and the evaluation (full study vs ``--quick``).
"""

from __future__ import annotations

import dataclasses

from .world import BioStyle


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder (`spt_jax.models.ModelConfig` switches: RMSNorm, SwiGLU, RoPE, tied)."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 384

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    style: BioStyle
    qa_share: float = 0.0  # share of pre-training words that are QA text about the post-training half
    general_share: float = 0.05  # share that is QA text about the world, never its people (the format's words)
    model: ModelShape = ModelShape()
    steps_factor: float = 1.0  # pre-training steps = factor x Scale.pretrain_steps
    width_factor: float = 1.0  # d_model and d_ff = factor x the scale's (heads kept)


RECIPES: tuple[Recipe, ...] = (
    Recipe("bio1_fixed_pronoun", "one biography per person, fixed sentence order, pronouns after the first",
           BioStyle(n_bios=1, permute=False, full_names=False)),
    Recipe("bio1_fixed_names", "one biography per person, fixed order, the full name in every sentence",
           BioStyle(n_bios=1, permute=False, full_names=True)),
    Recipe("bio5_fixed_pronoun", "five paraphrased biographies, fixed order, pronouns",
           BioStyle(n_bios=5, permute=False, full_names=False)),
    Recipe("bio5_permuted_names", "five paraphrases, permuted sentences, full names",
           BioStyle(n_bios=5, permute=True, full_names=True)),
    Recipe("bio5_permuted_names_qa", "as bio5_permuted_names, with 20% of the words QA text about the other half",
           BioStyle(n_bios=5, permute=True, full_names=True), qa_share=0.2),
    Recipe("bio5_permuted_names_narrow", "as bio5_permuted_names on a model half as wide",
           BioStyle(n_bios=5, permute=True, full_names=True), width_factor=0.5),
    Recipe("bio5_permuted_names_short", "as bio5_permuted_names with a third of the pre-training steps",
           BioStyle(n_bios=5, permute=True, full_names=True), steps_factor=1 / 3),
)
RECIPE_NAMES = tuple(r.name for r in RECIPES)
# --quick leaves out the recipe with its own model shape: each shape compiles every function anew
# (~1.5 min on one CPU core), and the quick run is a check of the pipeline, not a result.
QUICK_RECIPES = tuple(r.name for r in RECIPES if r.width_factor == 1.0)


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big everything is. ``pretrain_steps`` at ``batch_size`` rows of ``seq_len`` tokens."""

    name: str
    n_people: int
    model: ModelShape
    pretrain_steps: int
    batch_size: int = 32
    seq_len: int = 128
    learning_rate: float = 3e-3
    sft_steps: int = 150
    sft_batch_size: int = 32
    sft_learning_rate: float = 1e-3
    n_test: int = 200  # benchmark items per evaluation (the same items for every model and mode)
    k: int = 5  # few-shot demonstrations
    tune_steps: int = 80  # the method's soft-prompt settings: 80 steps at batch 8, 10 vectors
    tune_batch_size: int = 8
    prompt_length: int = 10
    eval_batch_size: int = 32

    def recipe_model(self, recipe: Recipe) -> ModelShape:
        def width(x: int) -> int:
            heads = self.model.n_heads
            return max(heads, int(round(x * recipe.width_factor / heads)) * heads)

        return dataclasses.replace(self.model, d_model=width(self.model.d_model), d_ff=width(self.model.d_ff))

    def recipe_steps(self, recipe: Recipe) -> int:
        return max(1, int(round(self.pretrain_steps * recipe.steps_factor)))


SCALES = {
    # Sized from measured costs on this project's 2-core EPYC: pre-training dominates (~0.12-0.17 s a
    # step at d_model 128, batch 16 x 128 tokens). The world is small because knowledge needs many
    # exposures: with 2000 people and 250 steps (each fact seen ~6 times) every post-trained model
    # stayed at chance (0.04-0.05); with 300 people and 2000 steps bio5_permuted_names reached 0.85
    # post-trained against 0.07 for bio1_fixed_pronoun (BUILD_NOTES.md, issue 12).
    "full": Scale("full", n_people=240, model=ModelShape(d_model=128, n_layers=2, n_heads=4, d_ff=384),
                  pretrain_steps=1200, batch_size=16, learning_rate=3e-3, sft_steps=150, sft_batch_size=16,
                  n_test=100),
    "quick": Scale("quick", n_people=120, model=ModelShape(d_model=64, n_layers=2, n_heads=4, d_ff=192),
                   pretrain_steps=100, batch_size=16, seq_len=128, sft_steps=30, sft_batch_size=16, n_test=36,
                   k=3, tune_steps=20, eval_batch_size=12),
}


def recipe_by_name(name: str) -> Recipe:
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPE_NAMES)}")
