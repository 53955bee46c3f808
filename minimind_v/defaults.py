"""Every stage's default steps, batch, learning rate and warm-up, and what it trains, in one place.

The training commands take their flag defaults from here and the recipe its sizes, so a stage run
alone (`python -m minimind_v.train.sft_vlm ...`) trains what the recipe trains. (Pure data: the
recipe reads it without importing torch.)
"""

TRAINING = {
    # The tiny CLIP: batches of 64 pictures, each with its caption and hard negatives.
    "clip": dict(steps=1000, batch_size=64, lr=2e-3, warmup_steps=50),
    "llm": dict(steps=300, batch_size=32, lr=2e-3, warmup_steps=20),
    "pretrain": dict(steps=1000, batch_size=32, lr=2e-3, warmup_steps=20),
    "sft": dict(steps=1500, batch_size=32, lr=1e-3, warmup_steps=20),
}
# What the VLM stages train besides the projection (train/common.py FREEZE_STRATEGIES).
FREEZE = {"pretrain": "all", "sft": "all"}
