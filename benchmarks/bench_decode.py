"""Answers: batch-1 tokens/s against the memory-bandwidth limit, beside the original v1 code; and
a left-padded batch of prompts against one prompt at a time.

One answer at a time (the chat, the panel) multiplies one token's vector by every weight per
step: its speed limit is how fast the machine reads the weights. This script measures that
limit in the same run (the read bandwidth, and the fp32 matmul peak for scale), then times, on
the same random weights, the same prompt (text around one picture's 50 placeholder tokens, the
image tokens given) and greedy decoding of the same number of tokens:

  - transformers' ``generate`` loop with ``F.linear`` everywhere (this package before row decoding),
  - ``model.generate`` as the package ships it (``minimind_v.model.decoding.row_decoding``),
  - the same without a KV cache (``use_cache=False``: every step recomputes the whole sequence),
  - with ``--original FOLDER`` (a checkout of jingyaogong/minimind-v at v1, commit 6982ced): the
    original's own ``Transformer.generate`` (temperature 0, its KV cache), given our weights
    through ``minimind_v.convert.model_to_v1``.

It then answers ``--batch`` prompts of different lengths (text around a picture) in one
left-padded batch (``minimind_v.model.chat_inputs.pad_rows``, as inference pads them) and one at a
time, both by ``model.generate``, greedy: answers/s, and how many batched answers equal the
one-at-a-time ones token for token.

    python benchmarks/bench_decode.py                            # small preset, 100 new tokens
    python benchmarks/bench_decode.py --original ~/minimind-v    # plus the original code
    python benchmarks/bench_decode.py --preset tiny --new-tokens 20 --repeats 1   # seconds

ms/token is the steady step: (time for K tokens - time for 1) / (K - 1); tokens/s includes the
prefill. "same tokens" counts the new tokens equal to the shipped path's, position by position.
Random weights cost exactly what trained ones do. On a shared machine expect noise: rows are
interleaved, medians of --repeats.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationMixin

from minimind_v.config import PRESETS
from minimind_v.convert import model_to_v1
from minimind_v.machine import matmul_gflops, read_gbytes_per_second
from minimind_v.model.chat_inputs import pad_rows
from minimind_v.model.vlm import MiniMindVLM, VLMConfig

V1_IMAGE_IDS = [30] * 25 + [32] * 25  # v1's placeholder: '<' * 25 + '>' * 25
EOS = 2


def make_model(preset: str, seed: int) -> MiniMindVLM:
    torch.manual_seed(seed)
    config = VLMConfig(**PRESETS[preset], vocab_size=6400, max_position_embeddings=1024, vision_width=768,
                       num_image_tokens=len(V1_IMAGE_IDS), image_token_ids=V1_IMAGE_IDS)
    return MiniMindVLM(config).eval()


def make_prompt(seed: int, text_tokens: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, text_tokens + 50) ids: 10 text tokens, the picture's 50 placeholders, the rest of the text;
    and (1, 50, 768) image tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 6400, (text_tokens,), generator=g)
    ids = torch.cat([text[:10], torch.tensor(V1_IMAGE_IDS), text[10:]])[None]
    return ids, torch.randn(1, len(V1_IMAGE_IDS), 768, generator=g)


def load_original(folder: Path, model: MiniMindVLM):
    """The original's Transformer, imported from a v1 checkout, holding ``model``'s weights."""
    if not (folder / "model" / "model.py").is_file():
        raise SystemExit(f"--original {folder}: no model/model.py there (a checkout of jingyaogong/minimind-v at v1)")
    sys.path.insert(0, str(folder))
    v1 = importlib.import_module("model.model")
    config = importlib.import_module("model.LMConfig").LMConfig(
        dim=model.config.dim, n_layers=model.config.n_layers, n_heads=model.config.n_heads,
        n_kv_heads=model.config.n_kv_heads, vocab_size=model.config.vocab_size, max_seq_len=1024,
        image_ids=V1_IMAGE_IDS)
    original = v1.Transformer(config).eval()
    original.load_state_dict(model_to_v1(model), strict=True)
    return original


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every matrix multiplied (the tied head once; the embedding
    lookup and the projection, used in the prefill only, left out)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and "vision_proj" not in name and "tok_embeddings" not in name and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    head = model.get_output_embeddings().weight
    return total + (0 if head.data_ptr() in seen else head.numel() * head.element_size())


def answers_table(model: MiniMindVLM, args) -> None:
    """Print answers/s for one left-padded batch of prompts vs the same prompts one at a time."""
    K, n = args.new_tokens, args.batch
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [make_prompt(args.seed + 1 + i, int(torch.randint(20, 31, (), generator=g))) for i in range(n)]
    ids, mask = (torch.tensor(rows) for rows in pad_rows([p[0].tolist() for p, _ in prompts], 0, "left"))
    image_tokens = torch.cat([tokens for _, tokens in prompts])
    greedy = dict(do_sample=False, max_new_tokens=K, min_new_tokens=K, eos_token_id=EOS, pad_token_id=0)

    def one_at_a_time():
        return torch.cat([model.generate(p, attention_mask=torch.ones_like(p), image_tokens=tokens, **greedy)
                          [:, p.shape[1]:] for p, tokens in prompts])

    def batched():
        return model.generate(ids, attention_mask=mask, image_tokens=image_tokens, **greedy)[:, ids.shape[1]:]

    rows = {"one prompt at a time (batch 1)": one_at_a_time, f"one left-padded batch of {n}": batched}
    with torch.no_grad():
        outputs = {name: run() for name, run in rows.items()}  # also the warm-up
        times = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    agree = int((outputs[f"one left-padded batch of {n}"] == outputs["one prompt at a time (batch 1)"]).all(1).sum())
    print(f"\nAnswers: {n} prompts of {int(mask.sum(1).min())}-{int(mask.sum(1).max())} tokens (50 image tokens), "
          f"left-padded to {ids.shape[1]}, {K} new tokens each, greedy; median of {args.repeats}")
    header = f"{'mode':<42} {'s/answer':>9} {'answers/s':>10} {'tokens/s':>9} {'vs first':>9}"
    print(header)
    print("-" * len(header))
    first = None
    for name in rows:
        rate = n / statistics.median(times[name])
        first = first or rate
        print(f"{name:<42} {1 / rate:>9.3f} {rate:>10.2f} {K * rate:>9.1f} {rate / first:>8.2f}x")
    print(f"(the batched answers equal the one-at-a-time answers for {agree} of {n} prompts)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--original", type=Path, default=None, help="a checkout of jingyaogong/minimind-v at v1")
    p.add_argument("--batch", type=int, default=8, help="prompts of the batched-answers table (0: no such table)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    K = args.new_tokens

    model = make_model(args.preset, args.seed)
    ids, image_tokens = make_prompt(args.seed)
    ones = torch.ones_like(ids)
    greedy = dict(do_sample=False, min_new_tokens=K, eos_token_id=EOS, pad_token_id=0)

    def transformers_loop(k):  # the mixin's generate, without this package's override
        return GenerationMixin.generate(model, ids, attention_mask=ones, image_tokens=image_tokens,
                                        max_new_tokens=k, **{**greedy, "min_new_tokens": k})[:, ids.shape[1]:]

    def shipped(k):
        return model.generate(ids, attention_mask=ones, image_tokens=image_tokens, max_new_tokens=k,
                              **{**greedy, "min_new_tokens": k})[:, ids.shape[1]:]

    def recomputing(k):  # no KV cache: every step runs the whole sequence again
        return model.generate(ids, attention_mask=ones, image_tokens=image_tokens, max_new_tokens=k, use_cache=False,
                              **{**greedy, "min_new_tokens": k})[:, ids.shape[1]:]

    rows = {"transformers generate, F.linear (before)": transformers_loop, "model.generate (shipped)": shipped,
            "model.generate, use_cache=False": recomputing}
    if args.original is not None:
        original = load_original(args.original.expanduser(), model)

        def original_loop(k):  # v1 stops at length max_new_tokens - 1; eos -1 never stops it early
            return list(original.generate(ids, -1, ids.shape[1] + k + 1, temperature=0.0, top_k=None,
                                          stream=False, rp=1.0, kv_cache=True, image_encoders=image_tokens))[-1]

        rows = {"original v1 Transformer.generate": original_loop, **rows}

    peak = matmul_gflops()
    bandwidth = read_gbytes_per_second()
    nbytes = weight_bytes(model)
    limit = bandwidth * 1e9 / nbytes
    print(f"machine: fp32 matmul {peak:.0f} GFLOP/s (2048², {torch.get_num_threads()} threads); memory read "
          f"{bandwidth:.1f} GB/s (sum over 256 MiB)")
    print(f"model: preset {args.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; a decode "
          f"step reads {nbytes / 2**20:.0f} MiB of weights -> at most {limit:.0f} tokens/s at that bandwidth")

    with torch.no_grad():
        reference = shipped(K)  # also a warm-up of every path
        outputs = {name: run(K) for name, run in rows.items()}
        times = {(name, k): [] for name in rows for k in (1, K)}
        for _ in range(args.repeats):  # round-robin, so drifting load hits every row alike
            for name, run in rows.items():
                for k in (1, K):
                    start = time.perf_counter()
                    run(k)
                    times[name, k].append(time.perf_counter() - start)

    print(f"\nBatch 1, an {ids.shape[1]}-token prompt (50 image tokens), {K} new tokens, greedy; median of {args.repeats}")
    header = (f"{'path':<42} {'s/answer':>9} {'tokens/s':>9} {'ms/token':>9} {'GB/s':>6} {'of limit':>9} "
              f"{'same tokens':>12} {'vs first':>9}")
    print(header)
    print("-" * len(header))
    first = None
    for name in rows:
        t_k, t_1 = statistics.median(times[name, K]), statistics.median(times[name, 1])
        per_token = (t_k - t_1) / max(K - 1, 1)
        rate = K / t_k
        first = first or rate
        same = int((outputs[name][0, :K] == reference[0, :K]).sum())
        print(f"{name:<42} {t_k:>9.3f} {rate:>9.1f} {1e3 * per_token:>9.2f} {nbytes / per_token / 1e9:>6.1f} "
              f"{rate / limit:>8.0%} {same:>6}/{K:<5} {rate / first:>8.2f}x")
    if args.batch > 0:
        answers_table(model, args)


if __name__ == "__main__":
    main()
