"""Stage 0: pretrain the MiniMind decoder on text alone.

The book's embedded default learns its words from the shapes world's captions and answers
(the image tags removed). A reader with the original MiniMind weights skips this stage and starts
the VLM from them instead.

    python -m minimind_v.train.llm --data runs/default/world --tokenizer runs/default/tokenizer \
        --out runs/default/llm --preset tiny --steps 300
    torchrun --standalone --nproc_per_node 2 -m minimind_v.train.llm ...   # the same, with DDP
"""

from __future__ import annotations

import argparse
import functools

from torch.utils.data import ConcatDataset

from ..config import PRESETS, config_from_preset
from ..data.datasets import collate, open_chat_dataset, resolve_data, skip_summary
from ..defaults import TRAINING
from ..model.llm import MiniMindForCausalLM
from ..tokenizer import load_tokenizer
from .checkpoint import TrainSetupError
from .common import add_train_flags, checked, lm_step_loss, path_setting, save_with_tokenizer, start_run
from .distributed import cleanup_distributed, print0
from .trainer import count_trainable, fit

TEXT_FILES = ("pretrain_data.json", "sft_data.json")


MIN_LENGTH = 2  # one token in, one to predict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (pretrain_data.json, sft_data.json)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--max-length", type=checked(int, low=MIN_LENGTH), default=256)
    p.add_argument("--use-moe", action="store_true", help="mixture-of-experts feed-forward")
    p.add_argument("--skip-bad-samples", action="store_true")
    add_train_flags(p, **TRAINING["llm"])
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    parser = build_parser()
    ns, args, info = start_run(parser, argv)
    tokenizer = load_tokenizer(ns.tokenizer)
    sources = []  # each records file once: pretrain_data.json / sft_data.json, or their parquet files
    for name in TEXT_FILES:
        try:
            path, _ = resolve_data(ns.data, name)
        except FileNotFoundError:
            continue
        if path not in sources:
            sources.append(path)
    parts = [open_chat_dataset(path, tokenizer, text_only=True, max_length=ns.max_length,
                               skip_bad_samples=ns.skip_bad_samples) for path in sources]
    if not parts:
        raise FileNotFoundError(f"none of {TEXT_FILES} (nor their parquet files) found in {ns.data}")
    dataset = ConcatDataset(parts)
    skipped = [s for p in parts for s in p.skipped]
    config = config_from_preset(ns.preset, vocab_size=len(tokenizer), use_moe=ns.use_moe,
                                max_position_embeddings=max(1024, ns.max_length))
    model = MiniMindForCausalLM(config).to(info.device)
    trainable, total = count_trainable(model)
    print0(f"text LM ({ns.preset}): {total / 1e6:.2f}M parameters, {len(dataset)} texts")
    if skipped:  # how many, for what, and the first few by name
        print0(skip_summary(skipped))
    # What decides the result besides the training flags (compared when resuming).
    settings = {"data": path_setting(ns.data, ns.out_dir), "tokenizer": path_setting(ns.tokenizer, ns.out_dir),
                "preset": ns.preset, "max_length": ns.max_length, "use_moe": ns.use_moe,
                "skip_bad_samples": ns.skip_bad_samples}
    try:
        summary = fit(model, dataset, functools.partial(collate, pad_id=tokenizer.pad_token_id or 0),
                      args, info, lm_step_loss, lambda m, out: save_with_tokenizer(m, tokenizer, out), settings)
    except TrainSetupError as err:
        parser.error(str(err))
    print0(f"done: {summary}")
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main()
