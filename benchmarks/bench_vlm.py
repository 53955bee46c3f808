"""How fast does MiniMind-V train, and how much of the machine does it use?

For one model size (default: the original ``small``, dim 512 / 8 layers, vocab 6400) at a
realistic batch (default 8 chats of ~20 prompt tokens + 50 image tokens + a 20-40 token answer,
lengths varied per sample so padding is real; encoded by ``minimind_v.tokenizer.encode_chat``
with a small byte-level BPE trained on the spot), it prints:

1. training steps as the trainer takes them (``backward_micro_batch``: the loss, backward;
   ``update_weights``: gradient clipping, AdamW from ``make_optimizer``): samples/s, tokens/s,
   the FLOPs of a step counted by ``torch.utils.flop_counter.FlopCounterMode``, achieved GFLOP/s
   and its share of a large matmul measured in the same run, and peak memory; for images encoded
   every step by a ViT-B/32-shaped CLIP vs patch tokens read from the feature cache, each with
   the decoder trained (freeze=all) or frozen (freeze=proj), plus "what if" rows that price
   choices the package makes (the padding mask, logits only at answer positions, AdamW's
   per-tensor loop);
2. where one step's time goes (torch.profiler), and checks of the count and the hot path;
3. with ``--original FOLDER`` (a checkout of jingyaogong/minimind-v at v1, commit 6982ced), one
   more row: the original's own training step (``OriginalRow``) on the same chats, pictures and
   starting weights, and the rows' samples/s against it (its loss on the first batch is checked
   equal to ours).

Answering (decoding) speed is measured by ``benchmarks/bench_decode.py``.

    python benchmarks/bench_vlm.py                    # small preset, ViT-B/32-sized random CLIP
    python benchmarks/bench_vlm.py --quick            # tiny sizes: a smoke run
    python benchmarks/bench_vlm.py --clip-width 256 --clip-layers 4 --steps 10
    python benchmarks/bench_vlm.py --skip-memory --original ~/minimind-v   # beside the v1 code

Random weights cost exactly what trained ones do, so nothing is downloaded. Rows are timed
round-robin (one step of each row in turn), so a burst of load from other programs slows them
all alike; each row reports the median of its timed steps, after warm-up steps. Peak memory is
measured in a fresh process per row, because a process's high-water mark cannot be reset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vision.py sits beside this file
from bench_vision import make_images, matmul_flops_per_second, synchronize  # noqa: E402

from minimind_v.config import IGNORE_INDEX, PRESETS as LM_PRESETS  # noqa: E402
from minimind_v.convert import model_to_v1  # noqa: E402
from minimind_v.data.datasets import Batch, Sample, collate  # noqa: E402
from minimind_v.data.features import FeatureCache  # noqa: E402
from minimind_v.data.images import load_image  # noqa: E402
from minimind_v.machine import usable_cores  # noqa: E402
from minimind_v.model.vision import VisionEncoder  # noqa: E402
from minimind_v.model.vlm import MiniMindVLM, VLMConfig  # noqa: E402
from minimind_v.precision import PRECISIONS, training_precision  # noqa: E402
from minimind_v.testing import make_random_clip  # noqa: E402
from minimind_v.tokenizer import (IMAGE_TAG, encode_chat, image_placeholder, load_tokenizer,  # noqa: E402
                                  train_tokenizer)
from minimind_v.train.common import lm_step_loss, set_trainable  # noqa: E402
from minimind_v.train.trainer import backward_micro_batch, make_optimizer, param_groups, update_weights  # noqa: E402

# ViT-B/32 geometry: 224 px / patch 32 -> 7 x 7 patches + CLS = 50 tokens per image.
IMAGE_SIZE, PATCH_SIZE = 224, 32
NUM_IMAGE_TOKENS = 1 + (IMAGE_SIZE // PATCH_SIZE) ** 2

# The synthetic chats' words. The tokenizer trained on them makes each word one token, so a
# chat's length is set by its word counts.
WORDS = tuple("""a the this that picture image photo shows there is are on in of with and red blue green
yellow white black small large round square cat dog bird car tree house table cup ball man woman child
near left right top bottom corner middle what where which color how many describe count sitting standing
two three four behind front under over""".split())

MEMORY_MARK = "MEMORY_RESULT "  # how a memory child process hands its numbers back
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # as the profiler names them

# FlopCounterMode has no formula for the CPU's fused attention kernels: give them the one the GPU
# kernels use, so attention is counted on both.
for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                       flop_counter.sdpa_backward_flop)):
    if _op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_op, get_raw=True)(_formula)  # already shape-wrapped


# ----------------------------------------------------------------------------- the data


@dataclass
class Chat:
    image: str  # image file name (also its feature-cache key)
    ids: list[int]  # encode_chat's ids: headers, placeholders, question, answer
    labels: list[int]  # the answer and its </s>; IGNORE_INDEX elsewhere


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def make_tokenizer(folder: Path, seed: int):
    """A byte-level BPE trained on a few hundred chats of WORDS (each word becomes one token)."""
    rng = np.random.default_rng(seed + 1)
    texts = [f"user\n{words(rng, 12)}\nassistant\n{words(rng, 30)}\n" for _ in range(300)]
    return train_tokenizer(texts, folder, vocab_size=2000)


def header_tokens(tokenizer) -> int:
    """Prompt text tokens of a chat with an empty question: its headers and separators."""
    prompt, _ = encode_chat(tokenizer, [{"from": "human", "value": IMAGE_TAG + "\n"}], NUM_IMAGE_TOKENS,
                            add_generation_prompt=True)
    return len(prompt) - NUM_IMAGE_TOKENS


def make_chats(tokenizer, image_names: list[str], prompt_text: tuple[int, int], answer: tuple[int, int],
               seed: int) -> list[Chat]:
    """One chat per image: prompt text tokens (headers included) and answer words drawn uniformly
    from the given (low, high) ranges, so batches need padding."""
    rng = np.random.default_rng(seed)
    headers = header_tokens(tokenizer)
    chats = []
    for name in image_names:
        question = words(rng, int(rng.integers(*prompt_text, endpoint=True)) - headers)
        reply = words(rng, int(rng.integers(*answer, endpoint=True)))
        conversation = [{"from": "human", "value": f"{IMAGE_TAG}\n{question}"}, {"from": "gpt", "value": reply}]
        chats.append(Chat(name, *encode_chat(tokenizer, conversation, NUM_IMAGE_TOKENS)))
    return chats


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
        # The trainer's optimizer, or the same AdamW with its fused kernel.
        self.optimizer = (torch.optim.AdamW(param_groups(self.model, 0.01), lr=1e-4, betas=(0.9, 0.95), fused=True)
                          if spec.variant == "fused_adamw" else make_optimizer(self.model, 0.01, 1e-4))
        self.step_loss = full_logits_step_loss if spec.variant == "full_logits" else lm_step_loss
        self.timed: list[tuple[float, int]] = []  # (seconds, step) per timed step
        self.flops = self.matmul_flops = 0  # counted over one step of the median step's batch

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
        batch = collate(samples, pad_id=w.pad_id)
        if self.spec.variant == "no_mask":  # right padding: causal attention alone never sees a pad
            batch = Batch(batch.ids, batch.input_ids, None, batch.labels, batch.images)
        return batch

    def step(self, step: int) -> None:
        """One optimizer step as trainer.fit takes it (one process, no accumulation)."""
        w = self.world
        batch = self.batch(step)
        targets = batch.n_targets  # counted before the batch moves to the device, as fit counts them
        backward_micro_batch(self.model, batch.to(w.device), self.step_loss, targets,
                             precision="bf16" if w.amp else "fp32")
        update_weights(self.model, self.optimizer, grad_clip=1.0)
        synchronize(w.device)

    def timed_step(self, step: int, record: bool) -> None:
        start = time.perf_counter()
        self.step(step)
        if record:
            self.timed.append((time.perf_counter() - start, step))

    def median_step(self) -> tuple[float, int]:
        """The timed step of median duration (the lower one of an even count), and which step it was."""
        return sorted(self.timed)[(len(self.timed) - 1) // 2]

    def count_flops(self) -> None:
        """Run the median step's batch once more under FlopCounterMode."""
        with flop_counter.FlopCounterMode(display=False) as counter:
            self.step(self.median_step()[1])
        self.flops = counter.get_total_flops()
        counts = counter.get_flop_counts()["Global"]
        self.matmul_flops = sum(n for op, n in counts.items() if str(op).replace(".", "::") in MATMUL_OPS)


# ----------------------------------------------------------------------------- the original v1 code

V1_IMAGE_IDS = [30] * 25 + [32] * 25  # v1's placeholder ids: '<' * 25 + '>' * 25
V1_MAX_SEQ_LEN = 200  # v1's LMConfig.max_seq_len: its datasets pad every sample to it


class OriginalRow:
    """The original v1 training step as its 2-sft_vlm.py takes it on a CPU (float32: v1 autocasts
    on CUDA only): v1's ``get_img_embedding`` (one CLIP call per picture, through a forward hook)
    on a CLIPModel holding the row's random vision weights, v1's ``Transformer`` starting from the
    same weights as the other rows (``convert.model_to_v1``), the same chats padded as v1's
    SFTDataset pads them (to 200 tokens, then shifted by one), the loss on answer tokens, backward,
    gradient clipping at 1.0 and v1's optimizer, Adam. The code is imported from a v1 checkout."""

    spec = RowSpec("original-v1", "original v1 code: encode every step, LM trained, fp32", "encode", "all")

    def __init__(self, world: "World", folder: Path):
        if not (folder / "model" / "model.py").is_file():
            raise SystemExit(f"--original {folder}: no model/model.py there (a checkout of jingyaogong/minimind-v at v1)")
        from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

        sys.path.insert(0, str(folder))
        v1 = importlib.import_module("model.model")
        self.embed = importlib.import_module("model.vision_utils").get_img_embedding
        ours = world.new_model()
        config = importlib.import_module("model.LMConfig").LMConfig(
            dim=ours.config.dim, n_layers=ours.config.n_layers, n_heads=ours.config.n_heads,
            n_kv_heads=ours.config.n_kv_heads, vocab_size=ours.config.vocab_size, max_seq_len=V1_MAX_SEQ_LEN,
            image_ids=V1_IMAGE_IDS)
        self.model = v1.Transformer(config).to(world.device)
        self.model.load_state_dict(model_to_v1(ours), strict=True)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        vision = CLIPVisionModel.from_pretrained(world.clip_dir)
        # v1 calls CLIPModel.get_image_features: a whole CLIPModel, its text tower as small as it goes
        text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        self.clip = CLIPModel(CLIPConfig(vision_config=vision.config.to_dict(), text_config=text)).eval()
        self.clip.vision_model.load_state_dict(vision.state_dict())
        self.clip.to(world.device)
        self.world = world
        self.X, self.Y, self.loss_mask = self._padded(world)
        self.timed: list[tuple[float, int]] = []
        self.flops = self.matmul_flops = 0

    @staticmethod
    def _padded(world: "World") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every chat as v1's SFTDataset returns it: our ids with v1's placeholder ids in place of
        ours, cut or padded with 0 to 200, X = ids[:-1], Y = ids[1:], the loss mask over Y's answer tokens."""
        ours = image_placeholder(world.tokenizer, NUM_IMAGE_TOKENS)[1]
        X, Y, masks = [], [], []
        for chat in world.chats:
            start = next(i for i in range(len(chat.ids)) if chat.ids[i:i + len(ours)] == ours)
            ids = chat.ids[:start] + V1_IMAGE_IDS + chat.ids[start + len(ours):]
            answer = [int(label != IGNORE_INDEX) for label in chat.labels]
            pad = V1_MAX_SEQ_LEN - len(ids)
            ids, answer = (ids + [0] * pad)[:V1_MAX_SEQ_LEN], (answer + [0] * pad)[:V1_MAX_SEQ_LEN]
            X.append(ids[:-1])
            Y.append(ids[1:])
            masks.append(answer[1:])
        return torch.tensor(X), torch.tensor(Y), torch.tensor(masks, dtype=torch.float32)

    def loss(self, step: int) -> torch.Tensor:
        """v1's loss on the batch of ``step``, as its train_epoch computes it."""
        w = self.world
        index = w.batch_indices(step)
        X, Y, loss_mask = (t[index].to(w.device) for t in (self.X, self.Y, self.loss_mask))
        # v1's DataLoader stacks one (1, 3, S, S) picture per sample: (B, 1, 3, S, S).
        image_encoders = self.embed({"pixel_values": w.pixels[index][:, None].to(w.device)}, self.clip)
        logits = self.model(X, Y, image_encoders=image_encoders).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=0, reduction="none")
        loss_mask = loss_mask.view(-1)
        return torch.sum(loss * loss_mask) / loss_mask.sum()

    def step(self, step: int) -> None:
        self.loss(step).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.world.device)

    timed_step, median_step, count_flops = TrainRow.timed_step, TrainRow.median_step, TrainRow.count_flops


# ----------------------------------------------------------------------------- shared setup


class World:
    """What every row shares: sizes, the tokenizer and chats, image files, pixels, the CLIP and its
    feature cache."""

    def __init__(self, args, scratch: Path, build: bool, need_encoder: bool = True, fingerprint: str | None = None):
        self.args = args
        self.device = torch.device(args.device)
        # As training chooses (precision.py): bf16 autocast where the device multiplies it natively.
        self.amp = training_precision(self.device, args.precision) == "bf16"
        self.image_dir, self.clip_dir, self.cache_dir = scratch / "images", scratch / "clip", scratch / "cache"
        heads = args.clip_heads or max(1, args.clip_width // 64)
        if build:  # the parent process makes the files; memory children reuse them
            self.image_dir.mkdir(parents=True, exist_ok=True)
            make_images(self.image_dir, args.pool)
            make_random_clip(self.clip_dir, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                             width=args.clip_width, layers=args.clip_layers, heads=heads, seed=args.seed)
            self.tokenizer = make_tokenizer(scratch / "tokenizer", args.seed)
        else:
            self.tokenizer = load_tokenizer(scratch / "tokenizer")
        if len(self.tokenizer) > args.vocab:
            raise SystemExit(f"the tokenizer has {len(self.tokenizer)} ids, more than --vocab {args.vocab}")
        if args.prompt_min <= (headers := header_tokens(self.tokenizer)):
            raise SystemExit(f"--prompt-min must exceed the {headers} tokens of the chat headers")
        self.pad_id = self.tokenizer.pad_token_id
        names = sorted(p.name for p in self.image_dir.iterdir())
        self.chats = make_chats(self.tokenizer, names, (args.prompt_min, args.prompt_max),
                                (args.answer_min, args.answer_max), args.seed)
        self.encoder = VisionEncoder.from_pretrained(self.clip_dir, device=self.device) if need_encoder else None
        if build:
            self.cache = FeatureCache.build(self.encoder, self.image_dir, self.cache_dir, progress=False)
        else:
            self.cache = FeatureCache.open(self.cache_dir, fingerprint or self.encoder.fingerprint())
        self._pixels = None

    @property
    def pixels(self) -> torch.Tensor:
        """Every image preprocessed once: (pool, 3, S, S), for the rows that encode every step."""
        if self._pixels is None:
            self._pixels = self.encoder.preprocess([load_image(self.image_dir / c.image) for c in self.chats])
        return self._pixels

    def new_model_config(self) -> VLMConfig:
        a = self.args
        return VLMConfig(vocab_size=a.vocab, vision_width=self.cache.width, num_image_tokens=NUM_IMAGE_TOKENS,
                         image_token_ids=image_placeholder(self.tokenizer, NUM_IMAGE_TOKENS)[1],
                         **LM_PRESETS[a.preset])

    def new_model(self) -> MiniMindVLM:
        torch.manual_seed(self.args.seed)  # every row starts from the same weights
        return MiniMindVLM(self.new_model_config()).to(self.device)

    def batch_indices(self, step: int) -> list[int]:
        B = self.args.batch_size
        return [(step * B + j) % len(self.chats) for j in range(B)]

    def batch_lengths(self, step: int) -> list[int]:
        """Real (unpadded) lengths of the step's samples."""
        return [len(self.chats[i].ids) for i in self.batch_indices(step)]


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
    on_gpu = world.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(world.device)
    before = torch.cuda.memory_allocated(world.device) / 2**20 if on_gpu else proc_status_mib("VmRSS")
    hwm_before = 0.0 if on_gpu else proc_status_mib("VmHWM")  # the process peak so far
    for step in range(2):  # AdamW allocates its state in step 1; step 2 holds everything at once
        row.step(step)
    peak = torch.cuda.max_memory_allocated(world.device) / 2**20 if on_gpu else proc_status_mib("VmHWM")
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
    from torch.profiler import ProfilerActivity, profile

    on_gpu = row.world.device.type == "cuda"
    best = None
    for _ in range(tries):
        with quiet_stderr():
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu, with_flops=True) as prof:
                row.step(step)
            wall = time.perf_counter() - start
        result = {"wall": wall, "matmul_s": 0.0, "attention_s": 0.0, "matmul_flops": 0}
        for event in prof.key_averages():
            seconds = (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e6
            if event.key in MATMUL_OPS:
                result["matmul_s"] += seconds
                result["matmul_flops"] += event.flops or 0
            elif "attention" in event.key:  # the SDPA wrapper and its fused kernels (self times do not overlap)
                result["attention_s"] += seconds
        if best is None or wall < best["wall"]:
            best = result
    return best


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
    p.add_argument("--vocab", type=int, default=6400, help="the model's vocabulary (the tokenizer's ids fit in it)")
    p.add_argument("--prompt-min", type=int, default=16, help="prompt text tokens, chat headers included")
    p.add_argument("--prompt-max", type=int, default=24)
    p.add_argument("--answer-min", type=int, default=20, help="answer tokens, its </s> not included")
    p.add_argument("--answer-max", type=int, default=40)
    p.add_argument("--skip-memory", action="store_true", help="no per-row memory processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--original", type=Path, default=None,
                   help="a checkout of jingyaogong/minimind-v at v1 (commit 6982ced): time its own training "
                        "step beside the rows")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="as training runs (default: MINIMIND_V_PRECISION, else auto: bf16 where native)")
    # Internal: a memory child process runs one row.
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what memory children are started with
    quick = args.quick
    defaults = dict(preset="tiny" if quick else "small", steps=3 if quick else 5, warmup=1 if quick else 2,
                    clip_width=64 if quick else 768, clip_layers=2 if quick else 12)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.pool = 4 * args.batch_size  # distinct chats and images
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.clip_width % (args.clip_heads or max(1, args.clip_width // 64)):
        p.error(f"--clip-width {args.clip_width} must be divisible by --clip-heads")
    if not args.prompt_min <= args.prompt_max or not 1 <= args.answer_min <= args.answer_max:
        p.error("need --prompt-min <= --prompt-max and 1 <= --answer-min <= --answer-max")
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
        config, enc = world.new_model_config(), world.encoder
        lm_params = sum(p.numel() for p in world.new_model().parameters())
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
        print(f"device: {device} ({hardware}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'bf16 autocast' if world.amp else 'float32'}")
        if warning := load_warning(os.cpu_count() or 1):
            print(warning)
        print(f"decoder: preset {args.preset} (dim {config.dim}, {config.n_layers} layers, FFN {config.hidden_dim}, "
              f"{config.n_heads} heads / {config.n_kv_heads} kv, vocab {config.vocab_size}), "
              f"{lm_params / 1e6:.1f}M parameters")
        print(f"encoder: random CLIP {IMAGE_SIZE} px / patch {PATCH_SIZE} -> {enc.num_tokens} tokens x {enc.width}, "
              f"{args.clip_layers} layers, {sum(p.numel() for p in enc.parameters()) / 1e6:.1f}M parameters, "
              f"{enc.flops_per_image() / 1e9:.2f} GFLOP/image; feature cache {world.cache.dtype} memory map")
        B = args.batch_size
        lengths = [len(c.ids) for c in world.chats]
        answers = [sum(label != IGNORE_INDEX for label in c.labels) - 1 for c in world.chats]  # without </s>
        prompts = [n - NUM_IMAGE_TOKENS - a - 2 for n, a in zip(lengths, answers)]  # 2: </s> and "\n" closing
        real = sum(sum(world.batch_lengths(s)) for s in range(args.warmup + args.steps))
        padded = sum(B * max(world.batch_lengths(s)) for s in range(args.warmup + args.steps))
        print(f"data: encode_chat with a byte-level BPE of {len(world.tokenizer)} ids; batch {B}, samples of "
              f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}: {min(prompts)}-{max(prompts)} "
              f"prompt text + {NUM_IMAGE_TOKENS} image + {min(answers)}-{max(answers)} answer + 2), right-padded: "
              f"{100 * (1 - real / padded):.0f}% of positions are padding")

        # ---- 1. training rows, round-robin
        rows = [TrainRow(spec, world) for spec in ROWS]
        same_loss = ""
        if args.original is not None:
            original = OriginalRow(world, args.original.expanduser().resolve())
            rows.append(original)
            with torch.no_grad():  # both start from the same weights: the same loss on the first batch, in fp32
                ours = float(lm_step_loss(rows[0].model, rows[0].batch(0).to(device))[0])
                same_loss = f"; first batch's loss in fp32: the original's {float(original.loss(0)):.6f}, ours {ours:.6f}"
        print(f"\n[{time.perf_counter() - started:.0f} s] timing {len(rows)} rows x ({args.warmup} warm-up + "
              f"{args.steps} timed) steps, round-robin ...", flush=True)
        peaks = []  # the matmul peak, measured once per round, under the same load as the rows
        for step in range(args.warmup + args.steps):
            for row in rows:
                row.timed_step(step, record=step >= args.warmup)
            if step >= args.warmup:
                # bench_vision's large matmul, best of 3, in the dtype autocast multiplies in
                flops, n = matmul_flops_per_second(device, torch.bfloat16 if world.amp else torch.float32, 3)
                peaks.append(flops)
        reference = statistics.median(peaks)
        for row in rows:
            row.count_flops()

        memory = {}
        if not args.skip_memory:
            # A fresh process costs seconds of imports: a smoke run checks the path on two rows only.
            measured = [r for r in ROWS if r.key in ("encode-all", "cache-proj")] if args.quick else ROWS
            print(f"[{time.perf_counter() - started:.0f} s] measuring peak memory, one fresh process per row "
                  f"({len(measured)} rows) ...", flush=True)
            fingerprint = world.cache.fingerprint
            parallel = 1 if device.type == "cuda" else min(2, os.cpu_count() or 1)  # each child may take ~1.5 GB
            with ThreadPoolExecutor(parallel) as pool:
                found = pool.map(lambda spec: measure_memory(spec, args, scratch, fingerprint), measured)
                memory = {spec.key: result for spec, result in zip(measured, found)}

        unit = "GPU MiB (max allocated)" if device.type == "cuda" else "MiB (process VmHWM)"
        print(f"\nTraining step: preset {args.preset}, batch {B}, {'bf16 autocast' if world.amp else 'float32'}; "
              f"median of {args.steps} steps; peak memory in {unit}")
        print(f"{'config':<52} {'samples/s':>9} {'tokens/s':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'% peak':>7} "
              f"{'peak MiB':>9} {'step +MiB':>9} {'vs baseline':>11}")
        print("-" * 130)
        base_rate = B / rows[0].median_step()[0]
        results = {}
        for row in rows:
            seconds, step = row.median_step()
            rate, gflops = B / seconds, row.flops / seconds / 1e9
            mem = memory.get(row.spec.key)
            peak_mib = f"{mem['peak']:,.0f}" if mem else "-"
            # '*': the process peaked while loading, before the steps; the step's own peak is lower.
            step_mib = (f"{mem['peak'] - mem['before']:,.0f}" + ("*" if mem["peak"] <= mem["setup_peak"] else "")
                        if mem else "-")
            results[row.spec.key] = (rate, gflops)
            print(f"{row.spec.label:<52} {rate:>9.2f} {sum(world.batch_lengths(step)) / seconds:>9.0f} "
                  f"{row.flops / 1e9:>7.2f} {gflops:>8.1f} {100 * gflops * 1e9 / reference:>6.0f}% {peak_mib:>9} "
                  f"{step_mib:>9} {rate / base_rate:>10.2f}x")
        print("GFLOP: one step of the median step's batch counted by torch.utils.flop_counter.FlopCounterMode "
              "(matmuls and attention as run, forward and backward, CLIP included, padding included, attention "
              "over the full square; norms, activations and AdamW not counted); GFLOP/s = GFLOP / median step time")
        print(f"% peak: against bench_vision's {n}x{n} {'bfloat16' if world.amp else 'float32'} matmul, best of 3, "
              f"measured after each timed round: median {reference / 1e9:,.1f} GFLOP/s (rounds: "
              + ", ".join(f"{p / 1e9:.0f}" for p in peaks) + ")")
        if memory and device.type != "cuda":
            print("step +MiB = VmHWM after 2 steps - VmRSS before the first (activations, gradients, AdamW state); "
                  "rows without CLIP do not load it")

        # ---- 2. where the time goes, and checks of the count and the hot path
        print("\nWhere one step's time goes (torch.profiler, feature-cache rows, the median step's batch):")
        print(f"{'row':<30} {'step s':>7} {'matmul':>7} {'attention':>9} {'other':>7} {'matmul GFLOP/s':>15} "
              f"{'matmul GFLOP: profiler / FlopCounterMode':>42}")
        for row in rows:
            if row.spec.key not in ("cache-all", "cache-proj"):
                continue
            prof = profile_step(row, row.median_step()[1])
            wall = prof["wall"]
            other = wall - prof["matmul_s"] - prof["attention_s"]
            mm_rate = prof["matmul_flops"] / max(prof["matmul_s"], 1e-9)
            print(f"{row.spec.label:<30} {wall:>7.3f} {100 * prof['matmul_s'] / wall:>6.0f}% "
                  f"{100 * prof['attention_s'] / wall:>8.0f}% {100 * other / wall:>6.0f}% "
                  f"{mm_rate / 1e9:>8.1f} ({100 * mm_rate / reference:.0f}%) "
                  f"{prof['matmul_flops'] / 1e9:>27.2f} / {row.matmul_flops / 1e9:.2f}")
        print("(matmul = aten::mm/addmm/bmm kernels; attention = the fused SDPA kernels; other = elementwise ops, "
              "norms, RoPE, AdamW, data, Python. Under the profiler steps run a little slower.)")

        frozen = next(r for r in rows if r.spec.key == "cache-proj")
        batch = frozen.batch(0).to(device)  # update_weights left no gradients behind
        lm_step_loss(frozen.model, batch)[0].backward()
        weight_grads = sum(p.grad is not None for name, p in frozen.model.named_parameters()
                           if not name.startswith("vision_proj."))
        trained = next(r for r in rows if r.spec.key == "cache-all").model
        with torch.no_grad():  # the same batch through the three loss paths of the what-if rows
            loss_answer = float(lm_step_loss(trained, batch)[0])
            nomask = Batch(batch.ids, batch.input_ids, None, batch.labels, batch.images)
            loss_nomask = float(lm_step_loss(trained, nomask)[0])
            loss_full = float(full_logits_step_loss(trained, batch)[0])
        print(f"checks: frozen LM -> weight gradients on {weight_grads} decoder tensors (expect 0); "
              f"loss with logits only at answers {loss_answer:.6f} = at every position {loss_full:.6f}; "
              f"without the padding mask {loss_nomask:.6f}{same_loss}")

    seconds = time.perf_counter() - started
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    cache_frozen = results["cache-proj"][0] / results["encode-all"][0]
    best = max(r[1] for r in results.values())
    print(f"\nsummary: feature cache + frozen LM trains {cache_frozen:.1f}x the samples/s of encoding every step "
          f"with the LM trained; best row {best:,.1f} GFLOP/s = {100 * best * 1e9 / reference:.0f}% of the "
          f"measured matmul peak; {seconds:.0f} s in all"
          + (f"; load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores" if load_end else ""))
    if "original-v1" in results:
        original = results["original-v1"][0]
        print("against the original v1 code on the same chats and weights (samples/s): "
              + "; ".join(f"{row.spec.label} {results[row.spec.key][0] / original:.2f}x" for row in rows
                          if row.spec.key in ("encode-all", "cache-all", "cache-proj")))
    if warning := load_warning(os.cpu_count() or 1, own=min(args.threads, os.cpu_count() or 1)):
        print(warning)


if __name__ == "__main__":
    main()
