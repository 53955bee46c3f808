"""Ask a trained MiniMind-V about a picture (or several); the answer streams out as it is generated.

    python -m minimind_v.chat --model runs/default/sft --image picture.png "What colour is the circle?"
    python -m minimind_v.chat --model runs/sft --image a.png --image b.png "Which picture has more circles?"

With several pictures, each ``--image`` fills one ``<image>`` tag of the question, in order; a
question without tags gets one per picture in front.
"""

from __future__ import annotations

import argparse
import sys

from transformers import TextStreamer

from .inference import answer, load_vlm
from .tokenizer import IMAGE_TAG


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", help="what to ask about the picture")
    p.add_argument("--model", required=True, help="a saved MiniMind-V folder")
    p.add_argument("--image", required=True, action="append",
                   help="an image file (any format PIL reads); repeat it for several pictures, one per <image> "
                        "tag of the question, in order")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="greedy only: guess up to K tokens ahead by copying what followed the answer's last tokens "
                        "earlier on, checked in one pass (the same answer; faster when answers repeat words)")
    p.add_argument("--device", default=None)
    ns = p.parse_args(argv)
    if not ns.question.strip():
        p.error("the question is empty")
    question, images = ns.question, list(ns.image)
    tags = question.count(IMAGE_TAG)
    if len(images) > 1 and tags == 0:
        question = "\n".join([IMAGE_TAG] * len(images) + [question])  # one tag per picture, in front
    elif tags not in (0, len(images)):
        p.error(f"the question has {tags} {IMAGE_TAG} tags but {len(images)} --image were given: "
                f"one picture per tag")
    try:
        model, processor = load_vlm(ns.model, device=ns.device)
    except (OSError, ValueError) as err:  # not a MiniMind-V folder, unsafe or missing weights, no encoder
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    sampling = {"do_sample": ns.temperature > 0}
    if ns.temperature > 0:
        sampling.update(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p)
    if ns.repetition_penalty:
        sampling["repetition_penalty"] = ns.repetition_penalty
    if ns.prompt_lookup < 0:
        p.error(f"--prompt-lookup {ns.prompt_lookup}: give a number of tokens, 0 or more")
    if ns.prompt_lookup:
        if ns.temperature > 0:
            p.error("--prompt-lookup is for greedy answers (--temperature 0)")
        sampling["prompt_lookup_num_tokens"] = ns.prompt_lookup
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        # One picture per question as a plain item; several as a list (one per <image> tag, in order).
        pictures = images[0] if len(images) == 1 else images
        return answer((model, processor), [pictures], [question], max_new_tokens=ns.max_new_tokens,
                      streamer=streamer, **sampling)[0]
    except ValueError as err:  # e.g. a question too long for the model, an unreadable image
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
