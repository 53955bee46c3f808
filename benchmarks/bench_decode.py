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
  - with prompt lookup (``prompt_lookup_num_tokens=--lookahead``): guesses copied from what
    followed the last few tokens' earlier occurrence, checked in one pass over the weights
    (``decoding.lookup_draft``; the same greedy tokens), in the package's loop and in
    transformers' own (its assisted decoding with ``PromptLookupCandidateGenerator``),
  - with ``--bounds``: how far any loop could go, ``FewestOperations`` (the same step with no
    ``generate`` loop or model forward around it, a preallocated key/value buffer), eager and
    under ``torch.compile``,
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
    python benchmarks/bench_decode.py --run runs/default --batch 0   # plus a trained run's answers

With ``--run`` (a run folder of the recipe) it also answers held-out pictures one at a time with
that run's trained models, as the chat does, with and without prompt lookup: the pretrained VLM
describing each picture (a caption of a dozen words) and the SFT model answering each picture's
question (a word or two). Random weights repeat themselves, which prompt lookup guesses best;
trained answers say how much it saves on text a model really writes.

ms/token is the steady step: (time for K tokens - time for 1) / (K - 1); tokens/s includes the
prefill; "passes" counts the passes over the decoder's weights for the K tokens (prompt included;
"-" where the row runs code of its own). "of limit" puts tokens/s against one pass per token: with
prompt lookup a pass can keep several tokens, and the answer can go past it. "same tokens" counts
the new tokens equal to the shipped path's, position by position.
Random weights cost exactly what trained ones do. On a shared machine expect noise: rows are
interleaved, medians of --repeats.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin

from minimind_v.config import PRESETS
from minimind_v.convert import model_to_v1
from minimind_v.machine import matmul_gflops, read_gbytes_per_second
from minimind_v.model.chat_inputs import pad_rows
from minimind_v.model.decoding import GrowingCache, column_blocks, rotation_factors, row_decoding, times_blocks
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


class FewestOperations:
    """A bound, not a path the package takes: greedy batch-1 decoding with as few Python-level
    operations as eager PyTorch allows. No ``generate`` loop and no model forward around the step;
    keys and values in one preallocated buffer per layer, attended with a mask so that every step
    has the same shapes (``torch.compile`` then makes one graph); the same block products, norms
    and rotation as the shipped step (``decoding.decode_one_row``). What a leaner loop, or a
    compiled step, could buy over the shipped path."""

    def __init__(self, model: MiniMindVLM, capacity: int, compiled: bool = False):
        cfg, threads = model.config, torch.get_num_threads()
        self.model, self.capacity = model, capacity
        self.layers = [(l.attention_norm.weight.detach(), column_blocks([l.attention.wq.weight, l.attention.wk.weight,
                                                                        l.attention.wv.weight], threads),
                        column_blocks([l.attention.wo.weight], threads), l.ffn_norm.weight.detach(),
                        column_blocks([l.feed_forward.w1.weight, l.feed_forward.w3.weight], threads),
                        column_blocks([l.feed_forward.w2.weight], threads)) for l in model.layers]
        self.head = column_blocks([model.output.weight], threads)
        with torch.inference_mode():
            self.keys = torch.zeros(len(model.layers), cfg.n_kv_heads, capacity, cfg.head_dim)
            self.values = torch.zeros_like(self.keys)
        self.step = torch.compile(self._step) if compiled else self._step

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (1,), position (1,) -> the next token (1,); writes this token's keys and values."""
        m, cfg = self.model, self.model.config
        H, Hkv, hd, dim, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.norm_eps
        n_qk = (H + Hkv) * hd
        c, s = rotation_factors(m.rope_cos.index_select(0, position).view(-1), m.rope_sin.index_select(0, position).view(-1))
        hidden = torch.arange(self.capacity) > position  # positions not written yet
        h = m.tok_embeddings.weight.index_select(0, token).view(1, 1, dim)
        for i, (attention_norm, qkv_blocks, wo, ffn_norm, w13, w2) in enumerate(self.layers):
            qkv = times_blocks(F.rms_norm(h, (dim,), attention_norm, eps), qkv_blocks)
            pairs = qkv[..., :n_qk].view(H + Hkv, hd // 2, 2)
            qk = (pairs * c + pairs.flip(-1) * s).view(H + Hkv, 1, hd)
            self.keys[i].index_copy_(1, position, qk[H:])
            self.values[i].index_copy_(1, position, qkv[..., n_qk:].view(Hkv, 1, hd))
            q = qk[:H].view(Hkv, H // Hkv, hd)
            scores = ((q @ self.keys[i].transpose(1, 2)) * hd**-0.5).masked_fill(hidden, float("-inf"))
            h = h + times_blocks((torch.softmax(scores, dim=-1) @ self.values[i]).view(1, 1, H * hd), wo)
            gate, up = times_blocks(F.rms_norm(h, (dim,), ffn_norm, eps), w13).chunk(2, dim=-1)
            h = h + times_blocks(F.silu(gate) * up, w2)
        return times_blocks(F.rms_norm(h, (dim,), m.norm.weight, eps), self.head).view(-1).argmax().view(1)

    def __call__(self, ids: torch.Tensor, image_tokens: torch.Tensor, k: int) -> torch.Tensor:
        """(1, k) greedy tokens after the prompt (read by the model's own forward, as generate reads it)."""
        P = ids.shape[1]
        if P + k > self.capacity:
            raise ValueError(f"prompt {P} + {k} new tokens exceed the buffer's {self.capacity} positions")
        with torch.inference_mode():  # no autograd bookkeeping on any tensor: fewer steps per operation
            with row_decoding(self.model):
                out = self.model(input_ids=ids, image_tokens=image_tokens, use_cache=True)
            for i, layer in enumerate(out.cache.layers):
                self.keys[i, :, :P], self.values[i, :, :P] = layer.keys[0], layer.values[0]
            tokens = [out.logits[0, -1].argmax().view(1)]
            for position in range(P, P + k - 1):
                tokens.append(self.step(tokens[-1], torch.tensor([position])))
            return torch.cat(tokens)[None].clone()


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


def pass_costs(model: MiniMindVLM, ids: torch.Tensor, image_tokens: torch.Tensor, repeats: int,
               rows=(1, 2, 3, 6, 11)) -> None:
    """Print what one pass over the weights costs for r new tokens after the prompt, against one:
    what checking r - 1 guesses costs (the one-token pass is the decoding step itself)."""
    times = {r: [] for r in rows}
    with row_decoding(model), torch.inference_mode():
        cache = GrowingCache(model.config.n_layers)
        model(input_ids=ids, image_tokens=image_tokens, cache=cache, use_cache=True, logits_to_keep=1)
        prompt = cache.get_seq_length()
        for _ in range(max(repeats, 1) * 10):  # round-robin; the first round is a warm-up
            for r in rows:
                start = time.perf_counter()
                model(input_ids=ids[:, -r:], cache=cache, use_cache=True)
                times[r].append(time.perf_counter() - start)
                cache.keep(prompt)
    one = statistics.median(times[1][1:])
    print("\nOne pass over the weights for r new tokens (r - 1 guesses checked), median of "
          f"{len(times[1]) - 1}: " + ", ".join(f"r={r} {1e3 * statistics.median(times[r][1:]):.2f} ms "
                                               f"({statistics.median(times[r][1:]) / one:.2f}x)" for r in rows))


class TokenCounter:
    """A streamer that counts the tokens of an answer (its first put is the prompt)."""

    def __init__(self):
        self.puts = 0

    def put(self, value):
        self.puts += 1

    def end(self):
        pass

    @property
    def tokens(self) -> int:
        return self.puts - 1


def trained_table(run: Path, n: int, lookahead: int, repeats: int) -> None:
    """Print tokens/s and passes per answer for a run's trained models, one held-out picture at a
    time, with and without prompt lookup (the same answers)."""
    from minimind_v.inference import answer, load_vlm
    from minimind_v.recipe import stage_dir

    world = stage_dir(run, "world")
    records = json.loads((world / "eval_data.json").read_text())[:n]
    pictures = [str(world / "eval_data_images" / r["image"]) for r in records]
    questions = [r["conversations"][0]["value"] for r in records]
    print(f"\nTrained ({run}): {n} held-out pictures answered one at a time (the chat's way), greedy; "
          f"median of {repeats}")
    header = (f"{'model, prompt':<44} {'lookahead':>9} {'tokens/answer':>13} {'passes/answer':>13} {'tokens/s':>9} "
              f"{'same answers':>12} {'vs plain':>9}")
    print(header)
    print("-" * len(header))
    for stage, asked in (("pretrain", ["Describe this picture briefly."] * n), ("sft", questions)):
        vlm = load_vlm(stage_dir(run, stage))
        passes = []
        vlm.model.norm.register_forward_hook(lambda *hook_args: passes.append(1))
        modes = {"plain": {}, "lookup": {"prompt_lookup_num_tokens": lookahead}}
        replies, tokens, counted, times = {}, {}, {}, {mode: [] for mode in modes}
        with torch.no_grad():
            for mode, extra in modes.items():  # also the warm-up
                passes.clear()
                counters = [TokenCounter() for _ in pictures]
                replies[mode] = [answer(vlm, [picture], [question], streamer=counter, **extra)[0]
                                 for picture, question, counter in zip(pictures, asked, counters)]
                tokens[mode], counted[mode] = sum(c.tokens for c in counters), len(passes)
            for _ in range(repeats):
                for mode, extra in modes.items():
                    start = time.perf_counter()
                    for picture, question in zip(pictures, asked):
                        answer(vlm, [picture], [question], **extra)
                    times[mode].append(time.perf_counter() - start)
        plain_rate = None
        for mode in modes:
            rate = tokens[mode] / statistics.median(times[mode])
            plain_rate = plain_rate or rate
            same = sum(a == b for a, b in zip(replies[mode], replies["plain"]))
            label = f"{stage}: {asked[0][:24]!r}" + (" ..." if stage == "sft" else "")
            print(f"{label:<44} {lookahead if mode == 'lookup' else 0:>9} {tokens[mode] / n:>13.1f} "
                  f"{counted[mode] / n:>13.1f} {rate:>9.1f} {same:>5}/{n:<6} {rate / plain_rate:>8.2f}x")
    print("(tokens/s: the answers' tokens over the time of the whole answer call, picture encoding included)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--original", type=Path, default=None, help="a checkout of jingyaogong/minimind-v at v1")
    p.add_argument("--batch", type=int, default=8, help="prompts of the batched-answers table (0: no such table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", type=Path, default=None, help="a recipe run folder: also its trained models' answers")
    p.add_argument("--run-pictures", type=int, default=50, help="held-out pictures for the --run table")
    p.add_argument("--lookahead", type=int, default=10,
                   help="guesses per pass of the prompt-lookup rows (prompt_lookup_num_tokens; 0: no such rows)")
    p.add_argument("--bounds", action="store_true",
                   help="also time the fewest-operations loop (class FewestOperations), eager and torch.compile'd")
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

    def looked_up(k):  # guesses by prompt lookup, checked in one pass
        return model.generate(ids, attention_mask=ones, image_tokens=image_tokens, max_new_tokens=k,
                              prompt_lookup_num_tokens=args.lookahead, **{**greedy, "min_new_tokens": k})[:, ids.shape[1]:]

    def transformers_looked_up(k):  # transformers' assisted decoding with its prompt-lookup candidates
        return GenerationMixin.generate(model, ids, attention_mask=ones, image_tokens=image_tokens, max_new_tokens=k,
                                        prompt_lookup_num_tokens=args.lookahead,
                                        **{**greedy, "min_new_tokens": k})[:, ids.shape[1]:]

    rows = {"transformers generate, F.linear (before)": transformers_loop, "model.generate (shipped)": shipped,
            "model.generate, use_cache=False": recomputing}
    if args.lookahead > 0:
        rows[f"model.generate, prompt lookup ({args.lookahead})"] = looked_up
        rows[f"transformers generate, prompt lookup ({args.lookahead})"] = transformers_looked_up
    compile_seconds = None
    if args.bounds:
        capacity = ids.shape[1] + K
        lean = FewestOperations(model, capacity)
        rows["fewest operations, eager (a bound)"] = lambda k: lean(ids, image_tokens, k)
        compiled = FewestOperations(model, capacity, compiled=True)
        start = time.perf_counter()
        compiled(ids, image_tokens, 2)  # the one graph, compiled before any timing
        compile_seconds = time.perf_counter() - start
        rows["fewest operations, torch.compile (a bound)"] = lambda k: compiled(ids, image_tokens, k)
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

    passes = []  # one per pass over the decoder's weights (the final norm runs once per pass)
    model.norm.register_forward_hook(lambda *hook_args: passes.append(1))
    counted = {}  # passes per answer, for the rows that run the model's own modules
    with torch.no_grad():
        reference = shipped(K)  # also a warm-up of every path
        outputs = {}
        for name, run in rows.items():
            passes.clear()
            outputs[name] = run(K)
            if name.startswith(("model.generate", "transformers")):
                counted[name] = len(passes)
        times = {(name, k): [] for name in rows for k in (1, K)}
        for _ in range(args.repeats):  # round-robin, so drifting load hits every row alike
            for name, run in rows.items():
                for k in (1, K):
                    start = time.perf_counter()
                    run(k)
                    times[name, k].append(time.perf_counter() - start)

    print(f"\nBatch 1, an {ids.shape[1]}-token prompt (50 image tokens), {K} new tokens, greedy; median of {args.repeats}")
    header = (f"{'path':<42} {'s/answer':>9} {'tokens/s':>9} {'ms/token':>9} {'GB/s':>6} {'of limit':>9} "
              f"{'passes':>7} {'same tokens':>12} {'vs first':>9}")
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
              f"{rate / limit:>8.0%} {counted.get(name, '-'):>7} {same:>6}/{K:<5} {rate / first:>8.2f}x")
    if compile_seconds is not None:
        print(f"(torch.compile of the fewest-operations step: {compile_seconds:.1f} s before the first token)")
    pass_costs(model, ids, image_tokens, args.repeats)
    if args.batch > 0:
        answers_table(model, args)
    if args.run is not None:
        trained_table(args.run, args.run_pictures, args.lookahead, args.repeats)


if __name__ == "__main__":
    main()
