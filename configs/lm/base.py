"""LRU language models at scale: the 125M, 350M and 1.3B presets on your own corpus.

    lrulm compile --config configs/lm/base.py:size=350m --topology v5p-32    # does it fit?
    lrulm tokenizer train --input 'corpus/train-*.jsonl' --output tok32k.model --vocab_size 32000
    python tools/prepare_data.py --input 'corpus/train-*.jsonl' --tokenizer tok32k.model \\
        --seq_len 2048 --output data/train --num_shards 256        # once, for large corpora
    python tools/prepare_data.py --input 'corpus/eval-*.jsonl' --tokenizer tok32k.model \\
        --seq_len 2048 --output data/eval --num_shards 8
    python launch/tpu_vm.py up --name lru-350m --zone ZONE --project PROJECT \\
        --accelerator_type v5p-32 -- \\
        lrulm train --config configs/lm/base.py:size=350m --workdir /gcs/BUCKET/runs/350m \\
        --config.data.train_files='data/train-*.arrayrecord' \\
        --config.data.eval_files='data/eval-*.arrayrecord' --config.data.tokenizer=tok32k.model

Sizes (lrulm.model_config.PRESETS; tokens per step = global batch x 2048):

  size   params  hardware it is sized for           mesh            batch  tokens/step
  125m   150M    8 chips: 8 x H100 or v5e-8 (one     data            256    0.5M
                 host), v4-16 (two hosts)
  350m   395M    v5p-32 / v4-64 (16-32 chips)        data x fsdp=4   512    1.0M
  1.3b   1.3B    v5p-128 / v5e-256 (64-256 chips)    data x fsdp=16  1024   2.1M

(parameter counts include the untied 32k-vocab embedding and head.) Steps are set for
~20 tokens per parameter (Chinchilla-style), e.g. 350m: 8k steps x 1.0M tokens. Check
the fit of a size on a slice before paying for it: `lrulm compile` (docs/tpu_fit.md has
a table of the bare presets at 8 sequences per chip; the remat below is this file's).
No reference loss has been measured with lrulm at these sizes yet; the expected result
is a loss curve close to a same-size Transformer's on the same data (the LRU paper's
claim for long-range tasks; untested here for language at scale), and per-chip
throughput at least twice the minimal-LRU baseline of docs/design.md §4.
"""

from lrulm.config import base_config

# size -> (preset, steps, global batch, fsdp, peak lr, remat). Learning rates follow the
# usual width scaling of GPT-style models (GPT-3 Table 2.1: 6e-4 at 125M, 3e-4 at 350M,
# 2e-4 at 1.3B); the LRU's recurrent parameters train at lr x 0.5. remat: the least
# recomputation with which the train step fits the hardware it is sized for (`lrulm
# compile`, 2026-12-04; without it 125m needs ~62.7 GiB a v5e chip, 350m ~157 GiB a v5p
# chip): 125m "lru" 6.9 of 16 GiB on v5e-8 ("dots" ~21.6, over); 350m "dots" 46.3 of 95
# GiB on v5p-32; 1.3b its preset's "full", 7.0 GiB on v5p-128.
SIZES = {
    "125m": ("125m", 6_000, 256, 1, 6e-4, "lru"),
    "350m": ("350m", 8_000, 512, 4, 3e-4, "dots"),
    "1.3b": ("1.3b", 13_000, 1024, 16, 2e-4, None),
}


def get_config(arg=None):
    """arg: "size=S" or just "S" (S in SIZES); none: 125m."""
    size = arg or "125m"
    if size.startswith("size="):
        size = size.removeprefix("size=")
    if size not in SIZES:
        raise ValueError(
            f"configs/lm/base.py takes size=S or S, S one of {', '.join(SIZES)}; got {arg!r} "
            "(other settings are overrides: --config.train.steps=...)"
        )
    preset, steps, batch, fsdp, lr, remat = SIZES[size]
    c = base_config()
    c.task = "lm"
    c.model.preset = preset
    c.model.remat = remat  # None: the preset's
    c.data.vocab_size = 32000  # when the tokenizer is trained into the workdir
    c.optim.lr = lr
    c.optim.lr_factor = 0.5
    c.optim.weight_decay = 0.1  # language-model practice (the LRA configs keep 0.05)
    c.optim.warmup_fraction = 0.02  # ~150-250 steps: enough for Adam's moments at this batch
    c.optim.grad_clip = 1.0
    c.optim.b2 = 0.95  # stabler than 0.999 for large-batch LM training
    c.train.steps = steps
    c.train.global_batch_size = batch
    c.train.seq_len = 2048
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.eval_steps = 50
    # The loss in vocabulary blocks: no (batch, 2048, 32k) f32 logits (256 MiB per
    # sequence with their gradient); see lrulm.model.cross_entropy.
    c.train.loss_vocab_block = 4096
    c.mesh.data = -1
    c.mesh.fsdp = fsdp
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 3
    c.checkpoint.keep_period = 2000  # permanent checkpoints for evaluation later
    return c
