"""Training loop shared by base training (here) and personalization (later).

Two stages: (1) SAM alone learns to segment the object under a point prompt; (2) everything
trains jointly with LISA's loss (text CE + 2.0 BCE + 0.5 Dice), the point-prompt loss kept on
as an auxiliary term so SAM's decoder stays anchored.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import cv2
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from segapp.build import Bundle, build_segllm, image_token_count, save_bundle
from segapp.config import ModelConfig, TrainConfig
from segapp.data.batches import BatchStream, TrainBatch
from segapp.data.queries import NO_TARGET_OPENINGS
from segapp.errors import InputError, ModelError
from segapp.modeling.segllm import SegLLM
from segapp.tokenizer import chat_format_for, load_tokenizer, train_tokenizer
from segapp.train_losses import AuxHeads, forward_losses
from segapp.video.training import is_video_step, make_video_sample, video_losses


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _state(model: SegLLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.llm.config.tie_word_embeddings:  # stored once, as the embedding
        state.pop("llm.lm_head.weight", None)
    return state


def _plain_name(name: str) -> str:
    """A parameter's SegLLM name with peft's wrapping taken out."""
    return name.replace("llm.base_model.model.", "llm.").replace(".base_layer.", ".")


def add_lora(model: SegLLM, rank: int) -> None:
    """Wrap the LLM with peft LoRA adapters on its q/v projections (LISA's recipe)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
    )
    model.llm = get_peft_model(model.llm, config)  # type: ignore[assignment]


def select_trainable(model: SegLLM, prefixes: Sequence[str] | None) -> int:
    """Freeze every parameter whose name starts with none of `prefixes` (None: train all; LoRA
    weights always train). Returns the number of trainable values; a prefix that names no
    parameter is an InputError."""
    named = list(model.named_parameters())
    if prefixes is not None:
        for prefix in prefixes:
            if not any(_plain_name(n).startswith(prefix) for n, _ in named):
                raise InputError(f"{prefix!r} names no parameter of the model", "--train")
    count = 0
    for name, param in named:
        wanted = prefixes is None or _plain_name(name).startswith(tuple(prefixes))
        param.requires_grad_(wanted or "lora_" in name)
        count += param.numel() if param.requires_grad else 0
    return count


def train(
    out_dir: Path,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    resume: bool = True,
    progress: bool = True,
    device: str = "cpu",
    on_step: Callable[[dict], None] | None = None,
    init_from: Bundle | None = None,
    trainable: Sequence[str] | None = None,
    lora_r: int = 0,
) -> dict:
    """Train a SegLLM into `out_dir` (weights + tokenizer + config + logs): from scratch, or
    from a loaded model (`init_from`: its config, tokenizer and weights; e.g. a plain LLaVA
    whose fresh [SEG] head is to be trained, or segapp weights to train further).

    trainable: parameter-name prefixes that train (None: all); lora_r > 0 adds LoRA adapters
    to the LLM's q/v projections (peft), merged into the weights when training ends.
    Resumable: a checkpoint is written every `checkpoint_every` steps and at the end of each stage.
    Returns the last logged losses.
    """
    from segapp.data.instructions import iter_corpus

    out_dir.mkdir(parents=True, exist_ok=True)
    # AdamW's second moments of rarely-used rows decay into float32 denormals after ~1000 steps
    # (beta2 = 0.95); on CPU denormal arithmetic is ~10x slower, so flush them to zero
    torch.set_flush_denormal(True)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    tok_path = out_dir / "tokenizer.json"
    ckpt = out_dir / "checkpoint"
    log_path = out_dir / "train_log.jsonl"
    if not resume:  # a fresh start must not mix with an earlier run's log or checkpoint
        shutil.rmtree(ckpt, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    if init_from is not None:
        model, tokenizer, chat = init_from.model.to(device), init_from.tokenizer, init_from.chat
        model_cfg = init_from.config
    else:
        if resume and tok_path.exists():
            tokenizer = load_tokenizer(tok_path)
        else:
            corpus = iter_corpus(
                200,
                seed=train_cfg.seed,
                answer_order=train_cfg.answer_order,
                multi_order=train_cfg.multi_order,
            )
            tokenizer = train_tokenizer(corpus, model_cfg.vocab_size)
            tokenizer.backend_tokenizer.save(str(tok_path))
        model = build_segllm(model_cfg, tokenizer).to(device)
        # the prompt template the model is built for (and will be served with)
        chat = chat_format_for(model_cfg.chat_format, tokenizer, image_token_count(model_cfg))
    if lora_r:
        add_lora(model, lora_r)
    select_trainable(model, trainable)
    token_probe = bool(train_cfg.token_probe or train_cfg.dense_probe)
    aux = AuxHeads(
        model_cfg, token_probe=token_probe, relation_probe=bool(train_cfg.relation_probe)
    ).to(device)
    if model.target_head is not None:  # training on from weights with one: it goes on
        aux.target.load_state_dict(model.target_head.state_dict())
    step = 0
    if resume and (ckpt / "state.json").exists():
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        model.llm.tie_weights()
        if (ckpt / "aux.safetensors").exists():
            # the optional probe heads may be absent from (or extra in) the checkpoint, e.g.
            # one saved before --token-probe existed; any other mismatch is an error
            found = aux.load_state_dict(load_file(str(ckpt / "aux.safetensors")), strict=False)
            optional = ("token_probe.", "relation.", "token_relation.")
            odd = [
                k
                for k in (*found.missing_keys, *found.unexpected_keys)
                if not k.startswith(optional)
            ]
            if odd:
                raise ModelError(
                    f"checkpoint does not match the training heads: {odd[:3]}",
                    str(ckpt / "aux.safetensors"),
                )
        step = json.loads((ckpt / "state.json").read_text())["step"]
    total_steps = train_cfg.sam_warmup_steps + train_cfg.steps
    stream = BatchStream(
        chat,
        model_cfg,
        seed=train_cfg.seed,
        start=step,
        images=train_cfg.images_per_batch,
        queries_per_image=train_cfg.queries_per_image,
        answer_order=train_cfg.answer_order,
        multi_order=train_cfg.multi_order,
    )
    # workers are forked: OpenCV's and tokenizers' thread pools must not be live in the parent
    cv2.setNumThreads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=train_cfg.workers,
        prefetch_factor=4 if train_cfg.workers else None,
        persistent_workers=False,
        timeout=600 if train_cfg.workers else 0,  # a stuck worker becomes an error, not a hang
        worker_init_fn=_background_worker,
    )
    opt = None
    stage = None
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not progress,
        desc="train",
        unit="step",
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    last: dict = {}
    started = time.perf_counter()
    model.train()
    for batch in loader:
        if step >= total_steps:
            break
        joint = step >= train_cfg.sam_warmup_steps
        if stage != joint:  # (re)build the optimiser at a stage boundary or after resume
            stage = joint
            modules = [model, aux] if joint else [model.sam, model.vision_tower, aux.probe]
            opt = torch.optim.AdamW(
                [p for m in modules for p in m.parameters() if p.requires_grad],
                lr=train_cfg.lr,
                betas=train_cfg.betas,
                weight_decay=train_cfg.weight_decay,
                # one fused kernel instead of a loop over ~200 tensors: 10.6 -> 2.0 ms a step
                fused=torch.device(device).type in ("cpu", "cuda"),
            )
            opt_path = ckpt / "optimizer.pt"
            if resume and step > 0 and opt_path.exists():
                saved = torch.load(opt_path, weights_only=True)
                if saved.get("joint") == joint:
                    opt.load_state_dict(saved["state"])
        assert opt is not None
        stage_step = step - (train_cfg.sam_warmup_steps if joint else 0)
        stage_len = train_cfg.steps if joint else train_cfg.sam_warmup_steps
        for group in opt.param_groups:
            group["lr"] = lr_at(stage_step, stage_len, train_cfg.warmup, train_cfg.lr)
        batch = _to(batch, device)
        point_prompt = step % 5 != 0 or train_cfg.video_fraction == 0  # see TrainConfig
        terms = forward_losses(
            model, aux, batch, train_cfg, model_cfg, joint=joint, point_prompt=point_prompt
        )
        if joint and is_video_step(step, train_cfg.video_fraction):
            clips = []
            for clip in range(train_cfg.video_clips):
                sample = make_video_sample(
                    model_cfg,
                    train_cfg.seed,
                    step,
                    extra=clip,
                    sam_frames=train_cfg.video_sam_frames,
                    answer_order=train_cfg.answer_order,
                )
                clips.append(video_losses(model, sample, chat, model_cfg, train_cfg, aux))
            video = {k: torch.stack([c[k] for c in clips if k in c]).mean() for k in clips[0]}
            terms.update(video)
            terms["total"] = terms["total"] + video["video_total"]
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], train_cfg.grad_clip
        )
        opt.step()
        step += 1
        bar.update(1)
        if step % train_cfg.log_every == 0 or step == total_steps:
            last = {k: round(float(v.detach()), 4) for k, v in terms.items()}
            last.update(
                step=step,
                lr=round(opt.param_groups[0]["lr"], 6),
                elapsed_s=round(time.perf_counter() - started, 1),
            )
            shown = ("total", "ce", "dice", "anchor", "pointer", "point_dice")
            bar.set_postfix({k: last[k] for k in shown if k in last})
            with log_path.open("a") as fh:
                fh.write(json.dumps(last) + "\n")
            if on_step:
                on_step(last)
        boundary = step == train_cfg.sam_warmup_steps or step == total_steps
        if step % train_cfg.checkpoint_every == 0 or boundary:
            _checkpoint(model, aux, opt, step, joint, ckpt)
    bar.close()
    model.eval()
    if lora_r:
        model.llm = cast(Any, model.llm).merge_and_unload()
    if train_cfg.target_weight:  # the target head completes multi-target answers (targets.py)
        model.target_head = copy.deepcopy(aux.target).to(model.device).eval()
        model_cfg = replace(model_cfg, target_head=True)
    if train_cfg.multi_order == "group_first":  # the predictor must know the first [SEG]
        model_cfg = replace(model_cfg, multi_group=True)
    if not model_cfg.no_target_openings:  # so a threshold in config.json can act on them
        model_cfg = replace(model_cfg, no_target_openings=NO_TARGET_OPENINGS)
    save_bundle(model, tokenizer, model_cfg, out_dir)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(train_cfg), indent=2) + "\n")
    return last


def _background_worker(_: int) -> None:
    """Data workers yield the CPU to the training step: on 2 cores a worker at normal
    priority preempts one of torch's two threads and the other waits at every op's barrier
    (0.61 s a step with a worker against 0.57 s generating the data inline); at the lowest
    priority it runs in the gaps the step leaves."""
    os.nice(19)


def _checkpoint(
    model: SegLLM, aux: AuxHeads, opt: torch.optim.Optimizer, step: int, joint: bool, ckpt: Path
) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(dict(aux.state_dict()), str(ckpt / "aux.safetensors"))
    save_file(_state(model), str(ckpt / "model.safetensors.tmp"))
    os.replace(ckpt / "model.safetensors.tmp", ckpt / "model.safetensors")
    torch.save({"joint": joint, "state": opt.state_dict()}, ckpt / "optimizer.pt.tmp")
    os.replace(ckpt / "optimizer.pt.tmp", ckpt / "optimizer.pt")
    (ckpt / "state.json.tmp").write_text(json.dumps({"step": step}))
    os.replace(ckpt / "state.json.tmp", ckpt / "state.json")


def _to(batch: TrainBatch, device: str) -> TrainBatch:
    if device == "cpu":
        return batch
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device, non_blocking=True))
    return batch
