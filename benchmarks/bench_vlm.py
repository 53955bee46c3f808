"""How fast does MiniMind-V train and answer, and how much of the machine does it use?

For one model size (default: the original ``small``, dim 512 / 8 layers, vocab 6400) at a
realistic batch (default 8 chats of ~20 prompt tokens + 50 image tokens + a 20-40 token answer,
lengths varied per sample so padding is real), it prints:

1. training steps (the trainer's loss path, backward, gradient clipping, AdamW): samples/s,
   tokens/s, achieved GFLOP/s and its share of a large float32 matmul measured in the same run,
   and peak memory; for images encoded every step by a ViT-B/32-shaped CLIP vs patch tokens read
   from the feature cache, each with the decoder trained (freeze=all) or frozen (freeze=proj),
   plus "what if" rows that price choices the package makes (the padding mask, logits only at
   answer positions, AdamW's per-tensor loop);
2. where one step's time goes (torch.profiler) and checks of the FLOP count and the hot path;
3. answering: decode tokens/s at batch 1 with and without the KV cache, and answers/s for a
   left-padded batch of prompts vs one prompt at a time.

    python benchmarks/bench_vlm.py                    # small preset, ViT-B/32-sized random CLIP
    python benchmarks/bench_vlm.py --quick            # tiny sizes: a smoke run
    python benchmarks/bench_vlm.py --clip-width 256 --clip-layers 4 --steps 10

Random weights cost exactly what trained ones do, so nothing is downloaded. Rows are timed
round-robin (one step of each row in turn), so a burst of load from other programs slows them
all alike; each row reports the median of its timed steps, after warm-up steps. Peak memory is
measured in a fresh process per row, because a process's high-water mark cannot be reset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vision.py sits beside this file
from bench_vision import make_images, matmul_flops_per_second, synchronize  # noqa: E402

from minimind_v.config import PRESETS as LM_PRESETS  # noqa: E402
from minimind_v.data.datasets import Batch, Sample, collate  # noqa: E402
from minimind_v.data.features import FeatureCache  # noqa: E402
from minimind_v.data.images import load_image  # noqa: E402
from minimind_v.config import IGNORE_INDEX  # noqa: E402
from minimind_v.machine import usable_cores  # noqa: E402
from minimind_v.model.chat_inputs import pad_rows  # noqa: E402
from minimind_v.model.vision import VisionEncoder  # noqa: E402
from minimind_v.testing import make_random_clip  # noqa: E402
from minimind_v.model.vlm import MiniMindVLM, VLMConfig  # noqa: E402
from minimind_v.train.common import lm_step_loss, set_trainable  # noqa: E402
from minimind_v.train.trainer import param_groups  # noqa: E402

# ViT-B/32 geometry: 224 px / patch 32 -> 7 x 7 patches + CLS = 50 tokens per image.
IMAGE_SIZE, PATCH_SIZE = 224, 32
NUM_IMAGE_TOKENS = 1 + (IMAGE_SIZE // PATCH_SIZE) ** 2

# Synthetic chat ids in the book's layout: <s>user\n <image> question </s>\n <s>assistant\n answer </s>\n
PAD, BOS, EOS, IMAGE_TOKEN, NEWLINE, USER, ASSISTANT = 0, 1, 2, 3, 4, 5, 6
USER_HEADER = [BOS, USER, NEWLINE]
END_OF_TURN = [EOS, NEWLINE]
ASSISTANT_HEADER = [BOS, ASSISTANT, NEWLINE]
FIRST_WORD_ID = 16  # ids below are kept for the specials above

MEMORY_MARK = "MEMORY_RESULT "  # how a memory child process hands its numbers back


# ----------------------------------------------------------------------------- the data


@dataclass
class Chat:
    image: str  # image file name (also its feature-cache key)
    prompt: list[int]  # ends with the assistant header, where generation starts
    ids: list[int]  # prompt + answer + </s>\n
    labels: list[int]  # the answer and its </s>; IGNORE_INDEX elsewhere


def make_chats(image_names: list[str], vocab: int, prompt_text: tuple[int, int],
               answer: tuple[int, int], seed: int) -> list[Chat]:
    """One chat per image: ~20 prompt text tokens (headers included), 50 image tokens, an answer.

    Lengths are drawn uniformly from the given (low, high) ranges, so batches need padding.
    """
    rng = np.random.default_rng(seed)
    fixed = len(USER_HEADER) + len(END_OF_TURN) + len(ASSISTANT_HEADER)
    chats = []
    for name in image_names:
        question = rng.integers(FIRST_WORD_ID, vocab, int(rng.integers(*prompt_text, endpoint=True)) - fixed)
        words = rng.integers(FIRST_WORD_ID, vocab, int(rng.integers(*answer, endpoint=True)))
        prompt = USER_HEADER + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + question.tolist() + END_OF_TURN + ASSISTANT_HEADER
        ids = prompt + words.tolist() + END_OF_TURN
        labels = [IGNORE_INDEX] * len(prompt) + words.tolist() + [EOS] + [IGNORE_INDEX]
        chats.append(Chat(name, prompt, ids, labels))
    return chats


# ----------------------------------------------------------------------------- FLOP count

FLOP_FORMULA = """\
FLOPs counted per training step (2 per multiply-add; only real tokens, never padding):
  N = decoder matmul weights without embeddings = L*(d*(d + 2*kv) + d*d + 3*d*h)
      (wq, wk, wv, wo, w1, w2, w3; kv = n_kv_heads*head_dim, h = FFN width)
  decoder      forward 2*N*t per sample of t real tokens
  attention    forward 2*L*d*t*(t+1) per sample (QK^T and AV over the causal triangle)
  output head  forward 2*d*V per answer token (the model computes logits only where the loss is)
  projection   forward 2*W*d per image token (W = CLIP width)
  backward, LM trained (freeze=all): 2x forward for decoder, attention and head (input and
               weight gradients); the projection's weight gradient only (its input is frozen)
  backward, LM frozen (freeze=proj): input gradients only: 1x forward for decoder and head,
               2x for attention; the projection's weight gradient; no frozen weight gradients
  CLIP encoder (rows that encode every step): forward only, VisionEncoder.flops_per_image()
  Not counted: norms, RoPE, activations, softmax, the embedding gather/scatter, AdamW."""


@dataclass
class ModelShape:
    dim: int
    layers: int
    kv_dim: int
    hidden: int
    vocab: int
    vision_width: int

    @classmethod
    def of(cls, config: VLMConfig) -> "ModelShape":
        return cls(config.dim, config.n_layers, config.n_kv_heads * config.head_dim, config.hidden_dim,
                   config.vocab_size, config.vision_width)

    @property
    def decoder_matmul_params(self) -> int:
        d = self.dim
        return self.layers * (d * (d + 2 * self.kv_dim) + d * d + 3 * d * self.hidden)


def step_flops(shape: ModelShape, lengths: list[int], n_targets: int, n_images: int, lm_trained: bool,
               clip_flops_per_image: int = 0) -> dict[str, int]:
    """Model FLOPs of one training step (see FLOP_FORMULA), split by part."""
    d, L = shape.dim, shape.layers
    tokens = sum(lengths)
    decoder = 2 * shape.decoder_matmul_params * tokens
    attention = sum(2 * L * d * t * (t + 1) for t in lengths)
    head = 2 * d * shape.vocab * n_targets
    projection = 2 * shape.vision_width * d * NUM_IMAGE_TOKENS * n_images
    backward = 2 if lm_trained else 1  # weight + input gradients, or input gradients only
    return {
        "decoder": decoder * (1 + backward),
        "attention": attention * 3,  # dQ, dK, dV need two forward-sized matmuls in both modes
        "head": head * (1 + backward),
        "projection": projection * 2,  # forward + weight gradient
        "clip": clip_flops_per_image * n_images,
    }


# ----------------------------------------------------------------------------- one training row


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    images: str  # "encode": pixels through CLIP; "jpeg": decode files + CLIP; "cache": cached tokens
    freeze: str  # set_trainable strategy: "all" (LM trained) or "proj" (LM frozen)
    variant: str = ""  # "" or a what-if: "no_mask" (causal only), "full_logits" (head at every
    # position), "fused_adamw" (AdamW's fused kernel instead of its per-tensor loop)


ROWS = [
    RowSpec("encode-all", "encode every step, LM trained", "encode", "all"),  # the baseline
    RowSpec("encode-proj", "encode every step, LM frozen", "encode", "proj"),
    RowSpec("cache-all", "feature cache, LM trained", "cache", "all"),
    RowSpec("cache-proj", "feature cache, LM frozen", "cache", "proj"),
    RowSpec("jpeg-all", "decode JPEGs + encode every step, LM trained", "jpeg", "all"),
    RowSpec("cache-all-nomask", "what if: cache, LM trained, no padding mask", "cache", "all", "no_mask"),
    RowSpec("cache-all-fulllogits", "what if: cache, LM trained, head at every position", "cache", "all",
            "full_logits"),
    RowSpec("cache-all-fusedadam", "what if: cache, LM trained, fused AdamW", "cache", "all", "fused_adamw"),
]


def full_logits_step_loss(model, batch: Batch):
    """The loss with logits at EVERY position (what lm_step_loss's labels path avoids)."""
    kwargs = {}
    if batch.images is not None:
        kwargs["pixel_values" if batch.images.dim() == 4 else "image_tokens"] = batch.images
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return loss, out.aux_loss, batch.n_targets


class TrainRow:
    """One configuration: its own model and optimizer, stepping through the shared batches."""

    def __init__(self, spec: RowSpec, world: "World"):
        self.spec, self.world = spec, world
        self.model = world.new_model()
        if spec.images != "cache":
            self.model.attach_vision_encoder(world.encoder)
        set_trainable(self.model, spec.freeze)
        self.model.train()
        # The trainer's optimizer (trainer.fit), or the fused what-if.
        fused = {"fused": True} if spec.variant == "fused_adamw" else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.01), lr=1e-4, betas=(0.9, 0.95), **fused)
        self.step_loss = full_logits_step_loss if spec.variant == "full_logits" else lm_step_loss
        self.timed: list[tuple[float, int, int]] = []  # (seconds, real tokens, model FLOPs) per timed step

    def batch(self, step: int) -> Batch:
        """The batch of `step`, read as the training loop's data path would (timed with the step)."""
        w = self.world
        samples = []
        for index in w.batch_indices(step):
            chat = w.chats[index]
            if self.spec.images == "cache":  # a memory-mapped row, as ChatDataset reads it
                image = w.cache[chat.image]
            elif self.spec.images == "jpeg":  # decode + resize + normalise, as ChatDataset does
                image = w.encoder.preprocess([load_image(w.image_dir / chat.image)])[0]
            else:  # pixels already prepared (by DataLoader workers, say)
                image = w.pixels[index]
            # A sample holds (n_images, ...) pictures: one here.
            samples.append(Sample(chat.image, torch.tensor(chat.ids), torch.tensor(chat.labels), image[None]))
        batch = collate(samples, pad_id=PAD)
        if self.spec.variant == "no_mask":  # right padding: causal attention alone never sees a pad
            batch = Batch(batch.ids, batch.input_ids, None, batch.labels, batch.images)
        return batch

    def step(self, step: int) -> float:
        """One optimizer step as trainer.fit runs it (one process, no accumulation); returns the loss."""
        w = self.world
        batch = self.batch(step).to(w.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=w.amp):
            mean_loss, extra, n = self.step_loss(self.model, batch)
            (mean_loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(mean_loss.detach())
        synchronize(w.device)
        return loss

    def timed_step(self, step: int, record: bool) -> None:
        start = time.perf_counter()
        self.step(step)
        seconds = time.perf_counter() - start
        if record:
            lengths, n_targets = self.world.batch_stats(step)
            flops = sum(self.world.flops(self.spec, lengths, n_targets).values())
            self.timed.append((seconds, sum(lengths), flops))

    def median_step(self) -> tuple[float, int, int]:
        """The timed step of median duration (the lower one of an even count): every column
        of a row then describes the same step."""
        return sorted(self.timed)[(len(self.timed) - 1) // 2]


# ----------------------------------------------------------------------------- shared setup


class World:
    """What every row shares: sizes, the chats, image files, pixels, the CLIP and its feature cache."""

    def __init__(self, args, scratch: Path, build: bool, need_encoder: bool = True, fingerprint: str | None = None):
        self.args = args
        self.device = torch.device(args.device)
        self.amp = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.image_dir = scratch / "images"
        self.clip_dir = scratch / "clip"
        self.cache_dir = scratch / "cache"
        heads = args.clip_heads or max(1, args.clip_width // 64)
        if build:  # the parent process makes the files; memory children reuse them
            self.image_dir.mkdir(parents=True, exist_ok=True)
            make_images(self.image_dir, args.pool)
            make_random_clip(self.clip_dir, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                             width=args.clip_width, layers=args.clip_layers, heads=heads, seed=args.seed)
        names = sorted(p.name for p in self.image_dir.iterdir())
        self.chats = make_chats(names, args.vocab, (args.prompt_min, args.prompt_max),
                                (args.answer_min, args.answer_max), args.seed)
        self.encoder = VisionEncoder.from_pretrained(self.clip_dir, device=self.device) if need_encoder else None
        if build:
            self.cache = FeatureCache.build(self.encoder, self.image_dir, self.cache_dir, progress=False)
        else:
            self.cache = FeatureCache.open(self.cache_dir, fingerprint or self.encoder.fingerprint())
        self.vision_width = self.cache.width
        self.clip_flops_per_image = self.encoder.flops_per_image() if self.encoder is not None else 0
        self._pixels = None
        self.shape = ModelShape.of(self.new_model_config())

    @property
    def pixels(self) -> torch.Tensor:
        """Every image preprocessed once: (pool, 3, S, S), for the rows that encode every step."""
        if self._pixels is None:
            self._pixels = self.encoder.preprocess([load_image(self.image_dir / c.image) for c in self.chats])
        return self._pixels

    def new_model_config(self) -> VLMConfig:
        a = self.args
        return VLMConfig(vocab_size=a.vocab, vision_width=self.vision_width, num_image_tokens=NUM_IMAGE_TOKENS,
                         image_token_ids=[IMAGE_TOKEN] * NUM_IMAGE_TOKENS, **LM_PRESETS[a.preset])

    def new_model(self) -> MiniMindVLM:
        torch.manual_seed(self.args.seed)  # every row starts from the same weights
        return MiniMindVLM(self.new_model_config()).to(self.device)

    def batch_indices(self, step: int) -> list[int]:
        B = self.args.batch_size
        return [(step * B + j) % len(self.chats) for j in range(B)]

    def batch_stats(self, step: int) -> tuple[list[int], int]:
        """Real (unpadded) lengths of the step's samples and its number of loss targets."""
        chats = [self.chats[i] for i in self.batch_indices(step)]
        return [len(c.ids) for c in chats], sum(sum(l != IGNORE_INDEX for l in c.labels[1:]) for c in chats)

    def flops(self, spec: RowSpec, lengths: list[int], n_targets: int) -> dict[str, int]:
        clip = self.clip_flops_per_image if spec.images != "cache" else 0
        return step_flops(self.shape, lengths, n_targets, len(lengths), spec.freeze == "all", clip)


# ----------------------------------------------------------------------------- memory


def proc_status_mib(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in MiB; NaN where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return float("nan")


def memory_child(args) -> None:
    """Run a few steps of one row in this fresh process and print its memory high-water mark."""
    spec = next(r for r in ROWS if r.key == args.memory_child)
    world = World(args, Path(args.scratch), build=False, need_encoder=spec.images != "cache",
                  fingerprint=args.fingerprint)
    row = TrainRow(spec, world)
    if world.encoder is not None:
        # from_pretrained memory-maps the weights: pages become resident on first use. Touch them
        # now, so the step's figure is the step's own memory, not the encoder's weights.
        world.encoder(world.pixels[:1])
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
        before = torch.cuda.memory_allocated(world.device) / 2**20
    else:
        before = proc_status_mib("VmRSS")
    hwm_before = proc_status_mib("VmHWM") if world.device.type != "cuda" else 0.0  # the process peak so far
    for step in range(2):  # AdamW allocates its state in step 1; step 2 holds everything at once
        row.step(step)
    if world.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(world.device) / 2**20
    else:
        peak = proc_status_mib("VmHWM")
    print(MEMORY_MARK + json.dumps({"peak": peak, "before": before, "setup_peak": hwm_before}), flush=True)


def measure_memory(spec: RowSpec, args, scratch: Path, fingerprint: str) -> dict | None:
    """Peak memory of one row, from a fresh process. It runs on one thread: memory does not
    depend on the thread count, and two children then share two cores without stalling."""
    command = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--threads", "1",
               "--memory-child", spec.key, "--scratch", str(scratch), "--fingerprint", fingerprint]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(MEMORY_MARK):
            return json.loads(line[len(MEMORY_MARK):])
    print(f"  memory run for {spec.key!r} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return None


# ----------------------------------------------------------------------------- profiling

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@contextlib.contextmanager
def quiet_stderr():
    """Hide file descriptor 2 for a while (the profiler's C++ side prints start/stop lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(row: TrainRow, step: int, tries: int = 2) -> dict:
    """Time and FLOPs of one step by kind of op: matmuls, fused attention, everything else.
    The fastest of `tries` profiled steps (the one least disturbed by other programs)."""
    return min((_profile_once(row, step) for _ in range(tries)), key=lambda r: r["wall"])


def _profile_once(row: TrainRow, step: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if row.world.device.type == "cuda" else [])
    with quiet_stderr():
        start = time.perf_counter()
        with profile(activities=activities, with_flops=True) as prof:
            row.step(step)
        wall = time.perf_counter() - start
    on_gpu = row.world.device.type == "cuda"
    matmul_us = attention_us = 0.0
    matmul_flops = 0
    for event in prof.key_averages():
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if event.key in MATMUL_OPS:
            matmul_us += us
            matmul_flops += event.flops or 0
        elif "attention" in event.key:  # the SDPA wrapper and its fused kernels (self times do not overlap)
            attention_us += us
    return {"wall": wall, "matmul_s": matmul_us / 1e6, "attention_s": attention_us / 1e6, "matmul_flops": matmul_flops}


def matmul_flops_analytic(shape: ModelShape, positions: int, n_targets: int, n_images: int, lm_trained: bool) -> int:
    """Matmul FLOPs (no attention, no CLIP) of a step over `positions` sequence positions."""
    factor = 3 if lm_trained else 2
    return (2 * shape.decoder_matmul_params * positions * factor + 2 * shape.dim * shape.vocab * n_targets * factor
            + 2 * shape.vision_width * shape.dim * NUM_IMAGE_TOKENS * n_images * 2)


# ----------------------------------------------------------------------------- answering


def time_call(function, device) -> float:
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with `count` CPU threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def decode_benchmarks(world: World, args) -> dict[str, float]:
    """Print the two answering tables; return the KV-cache and batching speed-ups."""
    device = world.device
    model = world.new_model().eval()
    n = min(args.eval_prompts, len(world.chats))
    chats = world.chats[:n]
    image_tokens = world.cache.get([c.image for c in chats]).to(device)  # (n, 50, W), as answer() gets them
    # Greedy; min_new_tokens keeps random weights from ending early, so every mode makes the same tokens.
    common = dict(do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    # On a CPU shared with other programs, a second thread can cost more than it gives at batch 1
    # (each small op waits for the slower thread), so those rows are also run on one thread.
    thread_counts = [torch.get_num_threads()] + ([1] if device.type == "cpu" and torch.get_num_threads() > 1 else [])

    # --- batch 1: with vs without the KV cache
    prompt = torch.tensor([chats[0].prompt], device=device)
    ones = torch.ones_like(prompt)
    K = args.decode_tokens

    def generate_one(new_tokens: int, use_cache: bool):
        return model.generate(prompt, attention_mask=ones, image_tokens=image_tokens[:1], max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, use_cache=use_cache, **common)

    same_tokens = torch.equal(generate_one(K, True), generate_one(K, False))  # also the warm-up
    modes = [(False, thread_counts[0]), (True, thread_counts[0])] + [(True, t) for t in thread_counts[1:]]
    # (mode, new tokens) -> seconds. One new token is the prefill alone, the same work with or
    # without the cache, so it is timed once per thread count (with the cache) and shared.
    runs = [(mode, K) for mode in modes] + [((True, t), 1) for t in thread_counts]
    times = {run: [] for run in runs}
    for _ in range(args.repeats):  # round-robin over the modes
        for (use_cache, threads), k in runs:
            with torch_threads(threads):
                times[(use_cache, threads), k].append(time_call(lambda: generate_one(k, use_cache), device))
    print(f"\nDecoding at batch 1: a {prompt.shape[1]}-token prompt (50 image tokens), {K} new tokens, greedy; "
          f"median of {args.repeats}")
    print(f"{'mode':<40} {'s/answer':>9} {'tokens/s':>9} {'prefill ms':>11} {'ms/token':>9} {'vs baseline':>12}")
    print("-" * 95)
    rates = {}
    for use_cache, threads in modes:
        t_k, t_1 = statistics.median(times[(use_cache, threads), K]), statistics.median(times[(True, threads), 1])
        per_token = (t_k - t_1) / max(K - 1, 1)  # the steady decode step, prefill taken out
        rate = rates[use_cache, threads] = K / t_k
        label = f"{'KV cache (use_cache=True)' if use_cache else 'no KV cache (use_cache=False)'}, {threads} thr"
        print(f"{label:<40} {t_k:>9.3f} {rate:>9.1f} {1e3 * t_1:>11.1f} {1e3 * per_token:>9.2f} "
              f"{rate / rates[modes[0]]:>11.2f}x")
    print(f"(tokens/s include the prefill; ms/token = (time for {K} tokens - time for 1) / {K - 1}. "
          f"Same tokens with and without the cache: {same_tokens})")

    # --- answers: one left-padded batch (as inference.answer does) vs one prompt at a time
    M = args.answer_tokens
    ids, mask = (torch.tensor(rows) for rows in pad_rows([c.prompt for c in chats], PAD, "left"))
    ids, mask = ids.to(device), mask.to(device)

    def batched():
        return model.generate(ids, attention_mask=mask, image_tokens=image_tokens, max_new_tokens=M,
                              min_new_tokens=M, **common)[:, ids.shape[1]:]

    def one(i: int):
        single = torch.tensor([chats[i].prompt], device=device)
        return model.generate(single, attention_mask=torch.ones_like(single), image_tokens=image_tokens[i:i + 1],
                              max_new_tokens=M, min_new_tokens=M, **common)[:, single.shape[1]:]

    batched_answers = batched()  # warm-up
    seconds = {}
    for _ in range(args.repeats):
        seconds.setdefault(("batched", thread_counts[0]), []).append(time_call(batched, device))
    singles = {}
    for threads in thread_counts:  # one pass over the prompts, each answer timed on its own
        with torch_threads(threads):
            for i in range(n):  # the loop this row measures against
                start = time.perf_counter()
                singles[i] = one(i)
                synchronize(device)
                seconds.setdefault(("single", threads), []).append(time.perf_counter() - start)
    agree = int((batched_answers == torch.cat([singles[i] for i in range(n)])).all(1).sum())
    print(f"\nAnswering {n} prompts of {int(mask.sum(1).min())}-{int(mask.sum(1).max())} tokens (left-padded to "
          f"{ids.shape[1]}), {M} new tokens each, greedy, image tokens from the cache")
    print(f"{'mode':<40} {'s/answer':>9} {'answers/s':>10} {'tokens/s':>9} {'vs baseline':>12}")
    print("-" * 84)
    answers = {}
    for key in [("single", t) for t in thread_counts] + [("batched", thread_counts[0])]:
        kind, threads = key
        # batched: median of repeats of the whole batch; one at a time: median over the prompts
        per_answer = statistics.median(seconds[key]) / (n if kind == "batched" else 1)
        answers[key] = 1 / per_answer
        label = (f"left-padded batch of {n}" if kind == "batched" else "one prompt at a time (batch 1)") + f", {threads} thr"
        print(f"{label:<40} {per_answer:>9.3f} {answers[key]:>10.2f} {M * answers[key]:>9.1f} "
              f"{answers[key] / answers['single', thread_counts[0]]:>11.2f}x")
    print(f"(batched: median of {args.repeats} runs of the whole batch; one at a time: median over the {n} prompts. "
          f"Batched answers equal one-at-a-time answers for {agree} of {n} prompts)")
    return {"kv_cache": rates[True, thread_counts[0]] / rates[False, thread_counts[0]],
            "batching": answers["batched", thread_counts[0]] / answers["single", thread_counts[0]]}


# ----------------------------------------------------------------------------- main


def load_warning(cores: int, own: float = 0.0) -> str:
    """A warning when other programs compete for the cores (their threads and ours then take turns).
    own: how much of the load average this benchmark itself makes (its threads, once it has run)."""
    if not hasattr(os, "getloadavg"):
        return ""
    load = os.getloadavg()[0]
    if load - own <= 0.5 * cores:
        return ""
    return (f"WARNING: 1-minute load average {load:.1f} on {cores} cores: other programs compete for the CPU. "
            f"Timings are unreliable (multithreaded ops stall whenever one of their threads is descheduled).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(LM_PRESETS), default=None, help="decoder size (default small)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps: a smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=usable_cores(),
                   help="CPU threads for torch (default: every core this process may use)")
    p.add_argument("--clip-width", type=int, default=None, help="random CLIP width (default 768, ViT-B/32)")
    p.add_argument("--clip-layers", type=int, default=None, help="random CLIP layers (default 12)")
    p.add_argument("--clip-heads", type=int, default=None, help="random CLIP heads (default width/64)")
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--prompt-min", type=int, default=16, help="prompt text tokens, chat headers included")
    p.add_argument("--prompt-max", type=int, default=24)
    p.add_argument("--answer-min", type=int, default=20)
    p.add_argument("--answer-max", type=int, default=40)
    p.add_argument("--eval-prompts", type=int, default=None, help="prompts answered in one batch (default 32)")
    p.add_argument("--answer-tokens", type=int, default=8, help="new tokens per batched answer")
    p.add_argument("--decode-tokens", type=int, default=None, help="new tokens in the batch-1 decode (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of the answering rows (default 3)")
    p.add_argument("--skip-memory", action="store_true", help="no per-row memory processes")
    p.add_argument("--seed", type=int, default=0)
    # Internal: a memory child process runs one row.
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what memory children are started with
    quick = args.quick
    defaults = dict(preset="tiny" if quick else "small", steps=3 if quick else 5, warmup=1 if quick else 2,
                    clip_width=64 if quick else 768, clip_layers=2 if quick else 12,
                    eval_prompts=8 if quick else 32, decode_tokens=8 if quick else 32, repeats=1 if quick else 3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.pool = max(4 * args.batch_size, args.eval_prompts)  # distinct chats and images
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.clip_width % (args.clip_heads or max(1, args.clip_width // 64)):
        p.error(f"--clip-width {args.clip_width} must be divisible by --clip-heads")
    if not 8 < args.prompt_min <= args.prompt_max or not 1 <= args.answer_min <= args.answer_max:
        p.error("need 8 < --prompt-min <= --prompt-max (8 tokens are chat headers) and 1 <= --answer-min <= --answer-max")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    device = torch.device(args.device)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        world = World(args, scratch, build=True)
        shape, enc = world.shape, world.encoder
        lm_params = sum(p.numel() for p in world.new_model().parameters())
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
        print(f"device: {device} ({hardware}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'bf16 autocast' if world.amp else 'float32'}")
        if warning := load_warning(os.cpu_count() or 1):
            print(warning)
        print(f"decoder: preset {args.preset} (dim {shape.dim}, {shape.layers} layers, FFN {shape.hidden}, "
              f"kv {shape.kv_dim}, vocab {shape.vocab}), {lm_params / 1e6:.1f}M parameters, "
              f"N = {shape.decoder_matmul_params / 1e6:.1f}M non-embedding matmul weights")
        print(f"encoder: random CLIP {IMAGE_SIZE} px / patch {PATCH_SIZE} -> {enc.num_tokens} tokens x {enc.width}, "
              f"{args.clip_layers} layers, {sum(p.numel() for p in enc.parameters()) / 1e6:.1f}M parameters, "
              f"{enc.flops_per_image() / 1e9:.2f} GFLOP/image; feature cache {world.cache.dtype} memory map")
        B = args.batch_size
        lengths = [len(c.ids) for c in world.chats]
        real = sum(sum(world.batch_stats(s)[0]) for s in range(args.warmup + args.steps))
        padded = sum(B * max(world.batch_stats(s)[0]) for s in range(args.warmup + args.steps))
        print(f"data: batch {B}, samples of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}: "
              f"{args.prompt_min}-{args.prompt_max} prompt text + {NUM_IMAGE_TOKENS} image + "
              f"{args.answer_min}-{args.answer_max} answer + 2), right-padded: "
              f"{100 * (1 - real / padded):.0f}% of positions are padding")

        def matmul_peak() -> float:  # bench_vision's large matmul, best of 3 (autocast's dtype on GPU)
            return matmul_flops_per_second(device, torch.bfloat16 if world.amp else torch.float32, 3)[0]

        n = 8192 if device.type == "cuda" else 2048  # bench_vision's matmul size

        # ---- 1. training rows, round-robin
        rows = [TrainRow(spec, world) for spec in ROWS]
        print(f"\n[{time.perf_counter() - started:.0f} s] timing {len(rows)} rows x ({args.warmup} warm-up + {args.steps} timed) steps, round-robin ...",
              flush=True)
        peaks = []  # the matmul peak, measured once per round, under the same load as the rows
        for step in range(args.warmup + args.steps):
            for row in rows:
                row.timed_step(step, record=step >= args.warmup)
            if step >= args.warmup:
                peaks.append(matmul_peak())
        reference = statistics.median(peaks)

        memory = {}
        if not args.skip_memory:
            # A fresh process costs seconds of imports: a smoke run checks the path on two rows only.
            measured = [r for r in ROWS if r.key in ("encode-all", "cache-proj")] if args.quick else ROWS
            print(f"[{time.perf_counter() - started:.0f} s] measuring peak memory, one fresh process per row ({len(measured)} rows) ...", flush=True)
            fingerprint = world.cache.fingerprint
            parallel = 1 if device.type == "cuda" else min(2, os.cpu_count() or 1)  # each child may take ~1.5 GB
            with ThreadPoolExecutor(parallel) as pool:
                found = pool.map(lambda spec: measure_memory(spec, args, scratch, fingerprint), measured)
                memory = {spec.key: result for spec, result in zip(measured, found)}

        unit = "GPU MiB (max allocated)" if device.type == "cuda" else "MiB (process VmHWM)"
        print(f"\nTraining step: preset {args.preset}, batch {B}, {'bf16 autocast' if world.amp else 'float32'}; "
              f"median of {args.steps} steps; peak memory in {unit}")
        print(f"{'config':<52} {'samples/s':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>7} {'peak MiB':>9} "
              f"{'step +MiB':>9} {'vs baseline':>11}")
        print("-" * 122)
        base_rate = B / rows[0].median_step()[0]
        results = {}
        for row in rows:
            seconds, tokens, flops = row.median_step()
            rate, gflops = B / seconds, flops / seconds / 1e9
            mem = memory.get(row.spec.key)
            peak_mib = f"{mem['peak']:,.0f}" if mem else "-"
            # '*': the process peaked while loading, before the steps; the step's own peak is lower.
            step_mib = (f"{mem['peak'] - mem['before']:,.0f}" + ("*" if mem["peak"] <= mem["setup_peak"] else "")
                        if mem else "-")
            results[row.spec.key] = (rate, gflops)
            print(f"{row.spec.label:<52} {rate:>9.2f} {tokens / seconds:>9.0f} {gflops:>8.1f} "
                  f"{100 * gflops * 1e9 / reference:>6.0f}% {peak_mib:>9} {step_mib:>9} {rate / base_rate:>10.2f}x")
        print(f"% peak: against bench_vision's {n}x{n} {'bfloat16' if world.amp else 'float32'} matmul, best of 3, "
              f"measured after each timed round: median {reference / 1e9:,.1f} GFLOP/s (rounds: "
              + ", ".join(f"{p / 1e9:.0f}" for p in peaks) + ")")
        if memory and device.type != "cuda":
            print("step +MiB = VmHWM after 2 steps - VmRSS before the first (activations, gradients, AdamW state); "
                  "rows without CLIP do not load it")
        print(FLOP_FORMULA)

        # ---- 2. where the time goes, and checks of the count and the hot path
        print("\nWhere one step's time goes (torch.profiler, feature-cache rows, step 0's batch):")
        print(f"{'row':<30} {'step s':>7} {'matmul':>7} {'attention':>9} {'other':>7} {'matmul GFLOP/s':>15} "
              f"{'matmul GFLOP: profiler / formula on padded batch / on real tokens':>66}")
        lengths0, targets0 = world.batch_stats(0)
        positions0 = B * max(lengths0)
        for row in rows:
            if row.spec.key not in ("cache-all", "cache-proj"):
                continue
            prof = profile_step(row, 0)
            wall = prof["wall"]
            trained = row.spec.freeze == "all"
            on_padded = matmul_flops_analytic(shape, positions0, targets0, B, trained)
            on_real = matmul_flops_analytic(shape, sum(lengths0), targets0, B, trained)
            other = wall - prof["matmul_s"] - prof["attention_s"]
            mm_rate = prof["matmul_flops"] / max(prof["matmul_s"], 1e-9)
            print(f"{row.spec.label:<30} {wall:>7.3f} {100 * prof['matmul_s'] / wall:>6.0f}% "
                  f"{100 * prof['attention_s'] / wall:>8.0f}% {100 * other / wall:>6.0f}% "
                  f"{mm_rate / 1e9:>8.1f} ({100 * mm_rate / reference:.0f}%) "
                  f"{prof['matmul_flops'] / 1e9:>24.2f} / {on_padded / 1e9:.2f} / {on_real / 1e9:.2f}")
        print("(matmul = aten::mm/addmm/bmm kernels; attention = the fused SDPA kernels; other = elementwise ops, "
              "norms, RoPE, AdamW, data, Python. Under the profiler steps run a little slower.)")

        frozen = next(r for r in rows if r.spec.key == "cache-proj")
        frozen.model.zero_grad(set_to_none=True)
        batch = frozen.batch(0).to(device)
        lm_step_loss(frozen.model, batch)[0].backward()
        weight_grads = sum(p.grad is not None for name, p in frozen.model.named_parameters()
                           if not name.startswith("vision_proj."))
        frozen.model.zero_grad(set_to_none=True)
        trained = next(r for r in rows if r.spec.key == "cache-all").model
        with torch.no_grad():  # the same batch through the three loss paths of the what-if rows
            loss_answer = float(lm_step_loss(trained, batch)[0])
            nomask = Batch(batch.ids, batch.input_ids, None, batch.labels, batch.images)
            loss_nomask = float(lm_step_loss(trained, nomask)[0])
            loss_full = float(full_logits_step_loss(trained, batch)[0])
        print(f"checks: frozen LM -> weight gradients on {weight_grads} decoder tensors (expect 0); "
              f"loss with logits only at answers {loss_answer:.6f} = at every position {loss_full:.6f}; "
              f"without the padding mask {loss_nomask:.6f}")

        # ---- 3. answering
        print(f"\n[{time.perf_counter() - started:.0f} s] answering ...", flush=True)
        answering = decode_benchmarks(world, args)

    seconds = time.perf_counter() - started
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    cache_frozen = results["cache-proj"][0] / results["encode-all"][0]
    best = max(r[1] for r in results.values())
    print(f"\nsummary: feature cache + frozen LM trains {cache_frozen:.1f}x the samples/s of encoding every step "
          f"with the LM trained; best row {best:,.1f} GFLOP/s = {100 * best * 1e9 / reference:.0f}% of the "
          f"measured matmul peak; KV cache decodes {answering['kv_cache']:.1f}x faster at batch 1; batched answers "
          f"{answering['batching']:.1f}x the answers/s of one at a time; {seconds:.0f} s in all"
          + (f"; load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores" if load_end else ""))
    if warning := load_warning(os.cpu_count() or 1, own=min(args.threads, os.cpu_count() or 1)):
        print(warning)


if __name__ == "__main__":
    main()
