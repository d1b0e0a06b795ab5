"""The controlled study behind claim (d), at CPU scale (`experiments/d_ranking_study.py` runs it).

A synthetic world whose knowledge is known exactly, several pre-training recipes that make that
knowledge more or less extractable, base models trained from scratch on the library's own decoder,
their post-trained (SFT) twins, and the question: which base-model evaluation mode ranks the
post-trained models as they really rank? Modules, one job each:

* `world`     -- people, attributes from closed sets, biographies from sentence templates, QA records;
* `data`      -- the world's word-level tokenizer, packed pre-training rows, SFT rows;
* `benchmark` -- the benchmark as an in-memory `spt_jax.tasks.Task`;
* `recipes`   -- the pre-training recipes and the study's scale (frozen dataclasses);
* `train`     -- pre-training and full SFT with optax, safetensors checkpoints, `LM` from weights;
* `pipeline`  -- one model's stages (pre-train, evaluate, SFT, evaluate), each resumable;
* `analysis`  -- rank correlations (`spt_jax.evaluate.mode_correlations`), plots, the summary;
* `runner`    -- the study folder: settings check, every model, the analysis files.

Only the library's public API is used for evaluation (`spt_jax.evaluate.evaluate` with an
`EvalConfig`); the training code here is what a user's own pre-training code would be.
"""
