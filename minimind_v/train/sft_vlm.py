"""Entry point: `python -m minimind_v.train.sft_vlm --data DIR --init DIR --out DIR [...]`,
or the same under `torchrun --standalone --nproc_per_node N -m minimind_v.train.sft_vlm ...`."""

from .vlm import run_stage

if __name__ == "__main__":
    run_stage("sft")
