"""Published checkpoint layouts, scaled down: LISA-7B-v1 and segment-anything .pth files (CPU).

The LISA folder is written the way LISA's merge script writes it (LISAForCausalLM.save_pretrained:
sharded pytorch_model-*.bin + index, bf16, config.json with the published field names, a LLaMA
tokenizer with [SEG] / <im_start> / <im_end> added, no CLIP weights) with small dimensions. The
stored names are made here from the modules LISA is built of (transformers' LLaMA, a
ModuleList[Sequential] head, segment_anything's Sam), not from segapp's mapping table, so the
test checks the table rather than repeating it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from segment_anything import sam_model_registry
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from segapp.build import LoadOptions, load_bundle, load_model
from segapp.checkpoints.sam import infer_sam_fields
from segapp.cli import run
from segapp.config import CHECKPOINT_ONLY_FIELDS, MODEL_PRESETS, ModelConfig
from segapp.data.instructions import generate_sample
from segapp.errors import InputError, ModelError
from segapp.modeling.builders import build_sam
from segapp.modeling.segllm import SegLLM
from segapp.predictor import Segmenter
from segapp.preprocess import postprocess_logits
from segapp.tokenizer import LlavaChatFormat
from segapp.weights import fetch, list_installed

HIDDEN, LAYERS, HEADS, MLP, OUT_DIM = 64, 2, 4, 128, 32
CLIP_HIDDEN, CLIP_SIZE, CLIP_PATCH = 32, 56, 14  # 16 image tokens (the real one: 224 / 14 -> 256)
SAM_CFG = ModelConfig(
    sam_image_size=64,
    sam_patch=8,
    sam_encoder_dim=32,
    sam_encoder_depth=2,
    sam_encoder_heads=4,
    prompt_dim=OUT_DIM,
    decoder_depth=2,
    decoder_mlp=64,
)
SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
INSTRUCTION = "Segment the red circle."


def _lisa_config(vocab_size: int) -> dict:
    """LISA-7B-v1's config.json fields (LISAForCausalLM over LLaVA-Lightning-7B-v1-1), small."""
    return {
        "_name_or_path": "LLaVA-Lightning-7B-v1-1",
        "architectures": ["LISAForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": True,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": MLP,
        "max_position_embeddings": 256,
        "max_sequence_length": 256,
        "mm_hidden_size": CLIP_HIDDEN,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "model_type": "llava",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "out_dim": OUT_DIM,
        "pad_token_id": 0,
        "pretrain_mm_mlp_adapter": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "train_mask_decoder": True,
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower": "openai/clip-vit-large-patch14",
        "vocab_size": vocab_size,
    }


def _llama_tokenizer(seg: bool = True) -> PreTrainedTokenizerFast:
    """A small LLaMA-style tokenizer (▁ word marks, <unk>/<s>/</s> = 0/1/2, BOS added) with
    LISA's additions: `[SEG]` as a plain added token (unless `seg` is false: a LLaVA one),
    `<im_start>` / `<im_end>` special."""
    corpus = [generate_sample("train", i).instruction for i in range(40)]
    corpus += ["A chat between a curious human and an artificial intelligence assistant.", "Sure,"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.pad_token = fast.unk_token  # as LISA sets it
    if seg:
        fast.add_tokens(["[SEG]"])
    fast.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return fast


def _random(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values everywhere, so a tensor landing in the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in state.items()}


def _lisa_state(vocab_size: int) -> dict[str, torch.Tensor]:
    """LISAForCausalLM.state_dict() minus the CLIP tower, from the modules LISA is built of."""
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=MLP,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    )
    state = dict(llama.state_dict())  # model.embed_tokens, model.layers.N.*, model.norm, lm_head
    state["model.mm_projector.weight"] = torch.zeros(HIDDEN, CLIP_HIDDEN)
    state["model.mm_projector.bias"] = torch.zeros(HIDDEN)
    head = nn.ModuleList(
        [
            nn.Sequential(
                nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT_DIM), nn.Dropout(0.0)
            )
        ]
    )
    state.update({f"model.text_hidden_fcs.{k}": v for k, v in head.state_dict().items()})
    sam = build_sam(SAM_CFG)  # segment_anything's own Sam: its names are LISA's visual_model's
    state.update({f"model.visual_model.{k}": v for k, v in sam.state_dict().items()})
    return {k: v.to(torch.bfloat16) for k, v in _random(state, seed=1).items()}


def _write_shards(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """save_pretrained's layout: two .bin shards and pytorch_model.bin.index.json."""
    keys = sorted(state)
    halves = {SHARDS[0]: keys[: len(keys) // 2], SHARDS[1]: keys[len(keys) // 2 :]}
    for shard, names in halves.items():
        torch.save({k: state[k].contiguous() for k in names}, directory / shard)
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": {k: shard for shard, names in halves.items() for k in names},
    }
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _read_shards(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in SHARDS:
        state.update(torch.load(directory / shard, weights_only=True))
    return state


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights root with lisa-7b/ (LISA's release layout) and clip-vit-large-patch14/."""
    root = tmp_path_factory.mktemp("weights")
    lisa = root / "lisa-7b"
    lisa.mkdir()
    tokenizer = _llama_tokenizer()
    tokenizer.save_pretrained(str(lisa))
    config = json.loads((lisa / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizer"  # what LISA's folder names
    (lisa / "tokenizer_config.json").write_text(json.dumps(config))
    (lisa / "config.json").write_text(json.dumps(_lisa_config(len(tokenizer)), indent=2))
    _write_shards(lisa, _lisa_state(len(tokenizer)))

    torch.manual_seed(2)
    clip = CLIPModel(
        CLIPConfig(
            vision_config={
                "image_size": CLIP_SIZE,
                "patch_size": CLIP_PATCH,
                "hidden_size": CLIP_HIDDEN,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "intermediate_size": 64,
            },
            text_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "vocab_size": 99,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
            projection_dim=16,
        )
    )
    clip.save_pretrained(str(root / "clip-vit-large-patch14"))
    return root


@pytest.fixture
def weights(weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEGAPP_WEIGHTS", str(weights_dir))
    return weights_dir


@pytest.fixture
def lisa_copy(weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private weights root to break: lisa-7b/ copied, the CLIP tower linked."""
    root = tmp_path / "weights"
    shutil.copytree(weights_dir / "lisa-7b", root / "lisa-7b")
    (root / "clip-vit-large-patch14").symlink_to(weights_dir / "clip-vit-large-patch14")
    monkeypatch.setenv("SEGAPP_WEIGHTS", str(root))
    return root / "lisa-7b"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_sample("test", 0).image


def _seg_masks(segmenter: Segmenter, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced LISA forward: prompt + "Sure, [SEG]." -> the hidden state that predicts
    [SEG] -> text_hidden_fcs -> SAM -> masks at the image size (and the IoU scores)."""
    model, chat = segmenter.model, segmenter.bundle.chat
    cache = segmenter.set_image(image)
    ids = torch.tensor([chat.prompt_ids(INSTRUCTION) + chat.answer_ids("Sure, [SEG].")])
    assert int((ids == model.seg_token_id).sum()) == 1
    with torch.inference_mode():
        embeds = model.embed_inputs(ids, cache.image_tokens)
        hidden = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
        picked = hidden[SegLLM.seg_source_mask(ids, model.seg_token_id)]
        low, iou = model.decode_masks(cache.sam_embedding, model.seg_prompts(picked))
        size = model.sam.image_encoder.img_size
        logits = postprocess_logits(low, cache.sam_input_size, cache.original_size, size)
    return logits, iou


# ---- LISA-7B-v1 layout -------------------------------------------------------------------------
def test_lisa_checkpoint_loads_every_parameter(weights: Path, image: np.ndarray) -> None:
    bundle = load_model("lisa-7b")
    model, stored = bundle.model, _read_shards(weights / "lisa-7b")
    clip = load_file(str(weights / "clip-vit-large-patch14" / "model.safetensors"))

    def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key].float()), key

    def under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    parts = ("model.visual_model.", "model.text_hidden_fcs.", "model.mm_projector.")
    llama = {k: v for k, v in stored.items() if not k.startswith(parts)}
    same(model.llm.state_dict(), llama)
    same(model.sam.state_dict(), under(stored, "model.visual_model."))
    same(model.projector.state_dict(), under(stored, "model.mm_projector."))
    fcs = under(stored, "model.text_hidden_fcs.0.")  # Sequential(Linear 0, ReLU, Linear 2, Dropout)
    same(model.text_hidden_fcs.state_dict(), fcs)
    tower = {k.removeprefix("vision_model."): v for k, v in model.vision_tower.state_dict().items()}
    same(tower, {k: v for k, v in under(clip, "vision_model.").items() if k != "position_ids"})
    # nothing else in the model: every parameter came from the checkpoint or the CLIP folder
    assert model.image_pos is None
    assert len(model.state_dict()) == len(stored) + len(tower)

    cfg = bundle.config
    assert (cfg.projector, cfg.vision_select_layer, cfg.chat_format) == ("linear", -2, "llava_v1")
    assert not cfg.tie_embeddings and cfg.vision_resize == "crop" and not cfg.image_pos
    assert model.llm.lm_head.weight.data_ptr() != model.llm.get_input_embeddings().weight.data_ptr()

    logits, iou = _seg_masks(Segmenter(bundle), image)
    assert logits.shape == (1, *image.shape[:2]) and torch.isfinite(logits).all()
    assert iou.shape == (1, 1) and torch.isfinite(iou).all()
    masks = (logits > 0).numpy()
    assert masks.dtype == bool and masks.shape[1:] == image.shape[:2]


def test_lisa_prompt_is_llava_v1_with_image_slots(weights: Path) -> None:
    bundle = load_model("lisa-7b")
    chat, tok = bundle.chat, bundle.tokenizer
    assert isinstance(chat, LlavaChatFormat)
    ids = chat.prompt_ids("Where is the cup?")
    n = (CLIP_SIZE // CLIP_PATCH) ** 2
    assert ids.count(chat.image_id) == n and ids[0] == tok.bos_token_id
    first = ids.index(chat.image_id)
    start, end = tok.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert ids[first - 1] == start and ids[first + n] == end  # <im_start> N slots <im_end>
    text = tok.decode([i for i in ids if i != chat.image_id])
    assert "A chat between a curious human" in text and "USER:" in text
    assert text.rstrip().endswith("ASSISTANT:")
    assert chat.seg_id == tok.convert_tokens_to_ids("[SEG]") and chat.eos_id == 2
    assert bundle.model.seg_token_id == chat.seg_id
    # the answer decodes with [SEG] kept as a word
    assert chat.decode(chat.answer_ids("Sure, [SEG].")[:-1]) == "Sure, [SEG]."


def test_lisa_segment_end_to_end(weights: Path, image: np.ndarray) -> None:
    result = Segmenter(load_model("lisa-7b"), max_new_tokens=4).segment(image, INSTRUCTION)
    assert isinstance(result.answer, str) and result.timings["prompt_tokens"] > 16
    assert all(m.mask.shape == image.shape[:2] for m in result.masks)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lisa_half_precision(weights: Path, image: np.ndarray, precision: str) -> None:
    bundle = load_model("lisa-7b", options=LoadOptions(precision=precision))
    model, dtype = bundle.model, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert model.llm.lm_head.weight.dtype == dtype
    assert model.sam.image_encoder.patch_embed.proj.weight.dtype == dtype
    assert model.projector.weight.dtype == dtype
    stored = _read_shards(weights / "lisa-7b")
    assert torch.equal(model.llm.lm_head.weight, stored["lm_head.weight"].to(dtype))
    logits, _ = _seg_masks(Segmenter(bundle), image)
    assert logits.shape == (1, *image.shape[:2]) and torch.isfinite(logits).all()


# ---- segment-anything .pth ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_published_sam_sizes(variant: str) -> None:
    """segapp's builder makes segment-anything's exact names and shapes for each published size,
    and the size is recognised from them (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        reference = sam_model_registry[variant]()
        ours = build_sam(ModelConfig(sam_variant=variant, prompt_dim=256))
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    assert infer_sam_fields(shapes, where="test") == {"sam_variant": variant, "prompt_dim": 256}


@pytest.fixture
def sam_pth(tmp_path: Path) -> Path:
    """A tiny SAM written the way segment-anything's checkpoints are: torch.save(sam.state_dict())."""
    sam = build_sam(MODEL_PRESETS["tiny"])
    path = tmp_path / "sam_tiny.pth"
    torch.save(_random(sam.state_dict(), seed=3), path)
    return path


def test_sam_pth_loads_into_the_sam_part(
    random_model_dir: Path, sam_pth: Path, image: np.ndarray
) -> None:
    stored = torch.load(sam_pth, weights_only=True)
    assert "image_encoder.patch_embed.proj.weight" in stored  # segment-anything's own names
    assert "mask_decoder.iou_prediction_head.layers.2.bias" in stored
    bundle = load_model(str(random_model_dir), options=LoadOptions(sam_checkpoint=sam_pth))
    got = bundle.model.sam.state_dict()
    assert got.keys() == stored.keys()
    for key in stored:
        assert torch.equal(got[key], stored[key]), key
    # the rest of the model is the bundle's own
    plain = load_bundle(random_model_dir).model
    assert torch.equal(bundle.model.projector[0].weight, plain.projector[0].weight)

    segmenter = Segmenter(bundle)
    cache = segmenter.set_image(image)
    reference = build_sam(MODEL_PRESETS["tiny"])
    reference.load_state_dict(stored)
    with torch.no_grad():
        from segapp.preprocess import sam_tensor

        pixels, _ = sam_tensor(image, reference.image_encoder.img_size)
        assert torch.allclose(cache.sam_embedding, reference.image_encoder(pixels[None]))
        prompts = torch.randn(2, 1, MODEL_PRESETS["tiny"].prompt_dim)
        low, iou = bundle.model.decode_masks(cache.sam_embedding, prompts)
    logits = postprocess_logits(low, cache.sam_input_size, cache.original_size, 128)
    assert logits.shape == (2, *image.shape[:2]) and torch.isfinite(logits).all()
    assert iou.shape == (2, 1)


def test_sam_pth_replaces_lisas_sam(weights: Path, tmp_path: Path) -> None:
    sam = build_sam(SAM_CFG)
    path = tmp_path / "sam_small.pth"
    torch.save(_random(sam.state_dict(), seed=4), path)
    bundle = load_model("lisa-7b", options=LoadOptions(sam_checkpoint=path))
    stored = torch.load(path, weights_only=True)
    for key, value in bundle.model.sam.state_dict().items():
        assert torch.equal(value, stored[key]), key


def test_sam_pth_of_another_size_is_named(random_model_dir: Path, tmp_path: Path) -> None:
    sam = build_sam(MODEL_PRESETS["tiny"].replace(sam_encoder_dim=48))
    path = tmp_path / "sam_other.pth"
    torch.save(sam.state_dict(), path)
    with pytest.raises(ModelError, match="image_encoder.pos_embed has shape"):
        load_model(str(random_model_dir), options=LoadOptions(sam_checkpoint=path))


# ---- missing / partial checkpoints ---------------------------------------------------------------
def _index(directory: Path) -> dict:
    return json.loads((directory / "pytorch_model.bin.index.json").read_text())


def _rewrite_shard(directory: Path, shard: str, change) -> None:
    state = torch.load(directory / shard, weights_only=True)
    change(state)
    torch.save(state, directory / shard)


def test_missing_shard_names_its_first_parameter(lisa_copy: Path) -> None:
    (lisa_copy / SHARDS[1]).unlink()
    first = next(k for k, f in _index(lisa_copy)["weight_map"].items() if f == SHARDS[1])
    with pytest.raises(ModelError) as info:
        load_model("lisa-7b")
    assert f"missing shard {SHARDS[1]}" in str(info.value) and first in str(info.value)


def test_missing_parameter_is_named(lisa_copy: Path) -> None:
    key = "model.layers.1.mlp.up_proj.weight"
    shard = _index(lisa_copy)["weight_map"][key]
    _rewrite_shard(lisa_copy, shard, lambda state: state.pop(key))
    index = _index(lisa_copy)
    del index["weight_map"][key]
    (lisa_copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=f"missing parameter {key}"):
        load_model("lisa-7b")


def test_parameter_listed_but_not_stored_is_named(lisa_copy: Path) -> None:
    key = "model.text_hidden_fcs.0.2.weight"
    shard = _index(lisa_copy)["weight_map"][key]
    _rewrite_shard(lisa_copy, shard, lambda state: state.pop(key))
    with pytest.raises(ModelError, match=f"missing parameter {key} \\(not in {shard}\\)"):
        load_model("lisa-7b")


def test_wrong_shape_is_named(lisa_copy: Path) -> None:
    key = "model.mm_projector.weight"
    shard = _index(lisa_copy)["weight_map"][key]

    def grow(state: dict) -> None:
        state[key] = torch.zeros(HIDDEN, CLIP_HIDDEN + 1, dtype=torch.bfloat16)

    _rewrite_shard(lisa_copy, shard, grow)
    with pytest.raises(ModelError) as info:
        load_model("lisa-7b")
    message = str(info.value)
    assert key in message and f"({HIDDEN}, {CLIP_HIDDEN + 1})" in message
    assert f"expected ({HIDDEN}, {CLIP_HIDDEN})" in message


def test_unexpected_parameter_is_named(lisa_copy: Path) -> None:
    key = "model.visual_model.mask_decoder.extra_head.weight"

    def add(state: dict) -> None:
        state[key] = torch.zeros(3, dtype=torch.bfloat16)

    _rewrite_shard(lisa_copy, SHARDS[0], add)
    index = _index(lisa_copy)
    index["weight_map"][key] = SHARDS[0]
    (lisa_copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=f"unexpected parameter {key}"):
        load_model("lisa-7b")


def test_missing_vision_tower_says_where_it_goes(lisa_copy: Path) -> None:
    (lisa_copy.parent / "clip-vit-large-patch14").unlink()
    with pytest.raises(ModelError, match="weights fetch clip-vit-large-patch14"):
        load_model("lisa-7b")


def test_tokenizer_without_seg_token(lisa_copy: Path) -> None:
    tok = _llama_tokenizer()
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    data = json.loads(plain.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[SEG]"]
    (lisa_copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"no \[SEG\] token"):
        load_model("lisa-7b")


def test_not_installed_preset_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEGAPP_WEIGHTS", str(tmp_path))
    with pytest.raises(ModelError, match="segapp weights fetch lisa-13b"):
        load_model("lisa-13b")


# ---- precision / quantization ------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_loading_needs_cuda(weights: Path, quantize: str) -> None:
    with pytest.raises(InputError, match=f"{quantize} loading needs a CUDA GPU"):
        load_model("lisa-7b", options=LoadOptions(quantize=quantize))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_4bit_without_cuda_is_one_line(
    weights: Path, tmp_path: Path, write_image, image: np.ndarray, capsys
) -> None:
    path = write_image(tmp_path / "a.png", image)
    code = run(["segment", str(path), INSTRUCTION, "--model", "lisa-7b", "--load-in-4bit"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs a CUDA GPU" in err


def test_tiny_config_json_keeps_its_keys() -> None:
    tiny = ModelConfig().to_dict()
    assert not set(CHECKPOINT_ONLY_FIELDS) & set(tiny)
    assert ModelConfig.from_dict(tiny) == ModelConfig()
    lisa = ModelConfig(projector="linear", chat_format="llava_v1").to_dict()
    assert lisa["projector"] == "linear" and ModelConfig.from_dict(lisa).chat_format == "llava_v1"


# ---- segapp weights ----------------------------------------------------------------------------
def test_weights_list(weights: Path, sam_pth: Path, capsys) -> None:
    shutil.copy(sam_pth, weights / "sam_vit_t.pth")
    try:
        entries = {e.name: e for e in list_installed(weights)}
        assert entries["lisa-7b"].kind == "LISA checkpoint"
        assert entries["clip-vit-large-patch14"].kind == "CLIP vision tower"
        assert entries["sam_vit_t.pth"].kind == "SAM checkpoint"
        shard = next(f for f in entries["lisa-7b"].files if f.path.endswith(SHARDS[0]))
        raw = (weights / shard.path).read_bytes()
        assert shard.size == len(raw) and shard.sha256 == hashlib.sha256(raw).hexdigest()

        assert run(["weights", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {w["name"] for w in listed["weights"]} == set(entries)
    finally:
        (weights / "sam_vit_t.pth").unlink()


def test_weights_fetch_offline_fails_fast(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEGAPP_WEIGHTS", str(tmp_path))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1"):
        fetch("lisa-7b", tmp_path)
    assert not (tmp_path / "lisa-7b").exists()
    assert run(["weights", "fetch", "lisa-7b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "xinlai/LISA-7B-v1" in err
    with pytest.raises(InputError, match="unknown weights"):
        fetch("nope", tmp_path)


def _add_to_shard(directory: Path, key: str, value: torch.Tensor) -> None:
    _rewrite_shard(directory, SHARDS[0], lambda state: state.__setitem__(key, value))
    index = _index(directory)
    index["weight_map"][key] = SHARDS[0]
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_name_no_rule_covers_is_unexpected(lisa_copy: Path) -> None:
    _add_to_shard(lisa_copy, "projector.weight", torch.zeros(HIDDEN, CLIP_HIDDEN))
    with pytest.raises(ModelError, match="unexpected parameter projector.weight"):
        load_model("lisa-7b")


def test_buffers_older_transformers_saved_are_dropped(lisa_copy: Path) -> None:
    """transformers < 4.31 wrote LLaMA's rotary inv_freq into checkpoints: known, recomputed."""
    _add_to_shard(lisa_copy, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    bundle = load_model(str(lisa_copy))  # a folder path takes the same route as the preset
    assert bundle.config.chat_format == "llava_v1" and bundle.source == str(lisa_copy)


def test_llava_without_seg_head_is_refused(lisa_copy: Path) -> None:
    config = json.loads((lisa_copy / "config.json").read_text())
    config["architectures"] = ["LlavaLlamaForCausalLM"]
    (lisa_copy / "config.json").write_text(json.dumps(config))
    index = _index(lisa_copy)
    for shard in SHARDS:
        _rewrite_shard(
            lisa_copy,
            shard,
            lambda state: [state.pop(k) for k in list(state) if "text_hidden_fcs" in k],
        )
    index["weight_map"] = {
        k: f for k, f in index["weight_map"].items() if "text_hidden_fcs" not in k
    }
    (lisa_copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"no text_hidden_fcs.*segapp train --init-from"):
        load_model(str(lisa_copy))


def test_failed_load_copies_nothing(tmp_path: Path) -> None:
    """A bad shape in the last shard is found before the first shard's values are copied."""
    from segapp.checkpoints.state import Source, index_checkpoint, load_strict

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {
        "0.weight": torch.ones(4, 4),
        "0.bias": torch.ones(4),
        "1.weight": torch.ones(2, 5),
        "1.bias": torch.ones(2),
    }
    _write_shards(tmp_path, state)
    with pytest.raises(ModelError, match=r"parameter 1.weight has shape \(2, 5\)"):
        load_strict(model, [Source(index_checkpoint(tmp_path), lambda key: key)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---- a plain LLaVA + a SAM .pth -> a trained [SEG] head (`segapp train --init-from`) ----------
@pytest.fixture
def llava_dir(weights: Path, tmp_path: Path) -> Path:
    """A LLaVA-v1 folder: no [SEG] token, no text_hidden_fcs, no SAM, no out_dim."""
    llava = tmp_path / "llava-7b"
    llava.mkdir()
    tokenizer = _llama_tokenizer(seg=False)
    tokenizer.save_pretrained(str(llava))
    config = _lisa_config(len(tokenizer))
    config["architectures"] = ["LlavaLlamaForCausalLM"]
    del config["out_dim"]
    (llava / "config.json").write_text(json.dumps(config))
    state = {
        k: v
        for k, v in _lisa_state(len(tokenizer)).items()
        if not k.startswith(("model.text_hidden_fcs.", "model.visual_model."))
    }
    _write_shards(llava, state)
    torch.save(_random(build_sam(SAM_CFG).state_dict(), seed=4), tmp_path / "sam.pth")
    return llava


def test_llava_plus_sam_trains_a_seg_head(llava_dir: Path, tmp_path: Path, image) -> None:
    out, sam = tmp_path / "llava-seg", tmp_path / "sam.pth"
    args = ["train", "--init-from", str(llava_dir), "--sam", str(sam), "--out", str(out)]
    assert run([*args, "--steps", "3", "--workers", "0", "--threads", "1"]) == 0
    bundle = load_model(str(out))  # now a segapp weights directory, [SEG] head and all
    assert "[SEG]" in bundle.tokenizer.get_vocab()
    assert bundle.config.chat_format == "llava_v1" and bundle.config.prompt_dim == OUT_DIM
    state = bundle.model.state_dict()
    stored = {k: v.float() for k, v in _read_shards(llava_dir).items()}
    vocab = stored["model.embed_tokens.weight"].shape[0]
    assert state["llm.model.embed_tokens.weight"].shape[0] == vocab + 1  # the [SEG] row
    # frozen parts are exactly the LLaVA weights; LoRA (q/v) was merged in; the head trained
    frozen = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(state[f"llm.{frozen}"], stored[frozen])
    assert torch.equal(state["projector.weight"], stored["model.mm_projector.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[f"llm.{q}"], stored[q])
    sam_state = torch.load(sam, weights_only=True)
    enc = "image_encoder.patch_embed.proj.weight"
    assert torch.equal(state[f"sam.{enc}"], sam_state[enc])
    dec = next(k for k in sam_state if k.startswith("mask_decoder.") and k.endswith("weight"))
    assert not torch.equal(state[f"sam.{dec}"], sam_state[dec])
    result = Segmenter(bundle).segment(image, INSTRUCTION)  # and it runs end to end
    assert isinstance(result.answer, str)


def test_init_from_refuses_unknown_prefix_and_preset(
    llava_dir: Path, tmp_path: Path, capsys
) -> None:
    base = ["train", "--init-from", str(llava_dir), "--sam", str(tmp_path / "sam.pth")]
    assert run([*base, "--out", str(tmp_path / "a"), "--train", "nonsense"]) == 2
    assert "'nonsense' names no parameter" in capsys.readouterr().err
    assert run([*base, "--out", str(tmp_path / "b"), "--preset", "tiny"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert run(["train", "--out", str(tmp_path / "c"), "--lora-r", "4"]) == 2
