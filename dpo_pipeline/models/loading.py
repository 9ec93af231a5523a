"""Model and tokenizer loading (dtype, device, 4-bit, LoRA): the only place that knows about devices."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import LoraParams, TrainParams


def require_safetensors(model_dir: str | Path) -> None:
    """Refuse a model folder whose weights are not safetensors (pickle weights can run code on load)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise StageError(f"{model_dir}: model folder not found (run the stage that produces it first)")
    files = {p.name for p in model_dir.iterdir()}
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(n for n in files if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    if pickles:
        raise StageError(
            f"{model_dir}: holds only pickle weights ({', '.join(pickles)}); expected *.safetensors. "
            "Pickle files can execute code when loaded, so they are refused."
        )
    raise StageError(f"{model_dir}: no *.safetensors weights found")


def damaged_file(
    folder: Path, required: tuple[str, ...] = (), whole: bool = False
) -> tuple[Path, str] | None:
    """(file, what is wrong) for the first file of a model, tokenizer, adapter or checkpoint folder that cannot be
    read: a required file missing, JSON that does not parse, a safetensors file whose header or length is broken
    (a cut or empty file). By default headers only (a flipped bit inside a tensor is `make verify`'s to find);
    `whole` also reads every tensor and every torch file (.pt, .pth, .bin), as a resume from a checkpoint does
    (trusted: only the run's own scratch folder is read that way)."""
    import json

    from safetensors import safe_open

    for name in required:
        if not (folder / name).is_file():
            return folder / name, "missing"
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as fh:
                    for key in fh.keys() if whole else ():
                        fh.get_tensor(key)
            elif whole and file.suffix in (".pt", ".pth", ".bin"):
                import torch

                torch.load(file, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any failure to read is the damage to report
            return file, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return None


@contextlib.contextmanager
def damage_named(folder: str | Path, what: str, required: tuple[str, ...] = ("config.json",)):
    """Inside: a load that fails on a damaged file becomes one StageError naming the file and the repair
    (any other failure propagates as it is)."""
    folder = Path(folder)
    try:
        yield
    except StageError:
        raise
    except Exception:
        found = damaged_file(folder, required) if folder.is_dir() else None
        if found is None:
            raise
        file, problem = found
        raise StageError(
            f"{file}: cannot be read ({problem}); the {what} in {folder} is damaged. Repair: `make verify` "
            f"names every bad file, `dvc checkout --force {folder}` restores it from the cache, `dvc pull` "
            "from the remote"
        ) from None


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with a model folder (never the hub)."""
    from transformers import AutoTokenizer

    with damage_named(model_dir, "tokenizer", required=("tokenizer_config.json",)):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.chat_template is None:
        raise StageError(f"{model_dir}: tokenizer has no chat template (expected ChatML)")
    return tokenizer


def special_tokens(tokenizer) -> list[str]:
    """The texts a tokenizer turns into its special (control) tokens wherever they occur in the input: its
    named special tokens and every added token marked special."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted({*tokenizer.all_special_tokens, *added})


def special_tokens_from_files(folder: str | Path) -> list[str]:
    """`special_tokens` read from a tokenizer's saved files without loading it (validate runs before the base
    stage): tokenizer.json's and tokenizer_config.json's added tokens marked special, special_tokens_map.json."""
    import json

    folder = Path(folder)
    found: set[str] = set()

    def read(name: str) -> Any:
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def content(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            return [value["content"]]
        if isinstance(value, list):
            return [c for v in value for c in content(v)]
        return []

    fast = read("tokenizer.json") or {}
    found.update(t["content"] for t in fast.get("added_tokens", []) if t.get("special") and "content" in t)
    config = read("tokenizer_config.json") or {}
    found.update(t["content"] for t in config.get("added_tokens_decoder", {}).values() if t.get("special"))
    for key, value in config.items():
        if key.endswith("_token") or key == "additional_special_tokens":
            found.update(content(value))
    for value in (read("special_tokens_map.json") or {}).values():
        found.update(content(value))
    return sorted(found)


@contextlib.contextmanager
def weights_read_not_mapped():
    """Inside: transformers reads safetensors shards with pread instead of memory-mapping them.

    On Linux transformers maps every shard for the whole load, so all of a checkpoint's pages count as
    resident until the load ends, on top of the (4-bit) model being built: loading the bench's 0.6B model
    in 4-bit peaks at ~2.7 GB RSS mapped, ~1.5 GB read (bench/, `large_*_load_peak_rss_mb`). pread is the
    backend transformers itself uses on Windows and MPS; the loaded tensors are bit-identical (tested).
    transformers 5.x has no option for it, so its module-level `safe_open` is swapped for the duration
    (restored after, also on errors); where that name is gone, loading is unchanged.
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:
        yield
        return

    def pread_open(filename, framework="pt", device="cpu", backend="mmap"):
        return original(filename, framework=framework, device=device, backend="pread")

    modeling_utils.safe_open = pread_open
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def load_model(model_dir: str | Path, **kwargs: Any):
    """A causal LM from a local folder: safetensors only, no remote code, never the hub."""
    from transformers import AutoModelForCausalLM

    require_safetensors(model_dir)
    kwargs.setdefault("trust_remote_code", False)
    with damage_named(model_dir, "model"), weights_read_not_mapped():
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, **kwargs
        )


def one_visible_gpu(visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a single-process stage: the first device of what the user made visible.

    unset -> "0"; "2,3" -> "2"; "GPU-1a2b,GPU-3c4d" -> "GPU-1a2b"; "" (none visible) stays "". On a host with
    several GPUs, the Trainer sets n_gpu to the visible count for a model placed on one device and wraps it in
    nn.DataParallel, which trl refuses; lm-eval and the merge would spread or pick devices of their own.
    """
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    return first


def pin_single_device(device: str, env: dict[str, str] | None = None) -> str | None:
    """Before any CUDA call, make a single-process stage on `device` ("cuda", "cpu" or "auto") see one GPU.

    Returns the CUDA_VISIBLE_DEVICES it set, or None when the stage runs on the CPU (nothing to pin). Stages
    started by torchrun / accelerate (LOCAL_RANK set) are left alone: there each process owns GPU LOCAL_RANK.
    """
    env = os.environ if env is None else env
    if device == "cpu" or "LOCAL_RANK" in env:
        return None
    env["CUDA_VISIBLE_DEVICES"] = one_visible_gpu(env.get("CUDA_VISIBLE_DEVICES"))
    return env["CUDA_VISIBLE_DEVICES"]


def resolve_device(device: str) -> str:
    """A params device ("cpu", "cuda", "auto") -> "cpu" or "cuda" ("auto" picks CUDA when it is available)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def model_dtype(precision: str) -> str:
    """The dtype the unquantized parts of the base are loaded in, from `train.precision`."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def bnb_config(t: TrainParams):
    """BitsAndBytesConfig for the frozen base (None when `train.load_in_4bit` is false)."""
    if not t.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=t.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=torch_dtype(t.bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=t.bnb_4bit_use_double_quant,
        # Sharding (train.distributed fsdp / zero3) splits floating-point tensors: the packed 4-bit weights are
        # stored as the compute dtype (peft's FSDP+QLoRA guide: bfloat16); the default uint8 stays unsharded.
        **(
            {"bnb_4bit_quant_storage": torch_dtype(t.bnb_4bit_compute_dtype)}
            if t.distributed != "ddp"
            else {}
        ),
    )


def lora_config(lora: LoraParams):
    """peft LoraConfig from `train.lora`."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def precision_kwargs(t: TrainParams) -> dict[str, Any]:
    """Trainer precision and device flags shared by the train and reference stages."""
    return {
        "bf16": t.precision == "bf16",
        "fp16": t.precision == "fp16",
        "use_cpu": resolve_device(t.device) == "cpu",
    }


def load_base(base_dir: str | Path, t: TrainParams):
    """The base as `train.*` loads it: dtype, 4-bit through bitsandbytes when `train.load_in_4bit`, device.

    No k-bit training preparation (see load_policy); bench's article-style ref_model is this alone.
    """
    device = resolve_device(t.device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(model_dtype(t.precision))}
    quantization = bnb_config(t)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # One whole model per process: under DDP, worker LOCAL_RANK owns GPU LOCAL_RANK.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank} if device == "cuda" else {"": "cpu"}
    model = load_model(base_dir, **kwargs)
    model.config.use_cache = False
    if quantization is not None:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # On CPUs with AVX512-BF16, bitsandbytes repacks the weights on the first no-grad eval-mode
                # forward and from then on multiplies in bf16: the reference log-probs would then depend on
                # whether they were computed in eval mode (reference stage, evaluation) or train mode (on the
                # fly), and the repacking fails for layers narrower than its 64-wide blocks. One path for all.
                module.support_avx512bf16_for_cpu = False
    return model


def load_policy(base_dir: str | Path, t: TrainParams):
    """The frozen base for QLoRA: load_base, then k-bit preparation when it is 4-bit.

    The reference stage loads the base through this same function, so cached and on-the-fly reference
    log-probs come from the same weights and dtypes.
    """
    from peft import prepare_model_for_kbit_training

    model = load_base(base_dir, t)
    if bnb_config(t) is not None:
        # Gradient checkpointing is switched on by the Trainer from `train.gradient_checkpointing`, not here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def rss_peak_mb() -> float:
    """This process's resident-set high-water mark in MiB.

    /proc/self/status VmHWM belongs to this process's own address space and starts afresh at exec.
    ru_maxrss does not: Linux carries it over fork + exec, so under `dvc repro` (or in a bench worker) it
    would report at least the parent's peak. ru_maxrss is only the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mb(device: str) -> float:
    """This process's peak memory in MiB: torch.cuda.max_memory_allocated on CUDA, else rss_peak_mb."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_peak_mb()


# ---- LoRA target modules, checked before any weights load -------------------------------------------------

# Module names of the decoder families laid out as Llama is (the builtin model and the 7B recipe are Mistral):
# per layer under model.layers.<i>, and the top-level ones. Kinds: what peft's LoRA makes of a module it
# targets ("linear", "embedding") or "other" (a container or a norm, which peft refuses as a target).
# tests/unit/test_target_modules.py checks each family against the model transformers builds on the meta device.
_LAYER_MODULES = {
    "self_attn": "other",
    "self_attn.q_proj": "linear",
    "self_attn.k_proj": "linear",
    "self_attn.v_proj": "linear",
    "self_attn.o_proj": "linear",
    "mlp": "other",
    "mlp.gate_proj": "linear",
    "mlp.up_proj": "linear",
    "mlp.down_proj": "linear",
    "mlp.act_fn": "other",
    "input_layernorm": "other",
    "post_attention_layernorm": "other",
}
_TOP_MODULES = {
    "model": "other",
    "model.embed_tokens": "embedding",
    "model.layers": "other",
    "model.norm": "other",
    "model.rotary_emb": "other",
    "lm_head": "linear",
}
KNOWN_MODULE_LAYOUTS = {
    "mistral": {},
    "llama": {},
    "qwen2": {},
    "qwen3": {"self_attn.q_norm": "other", "self_attn.k_norm": "other"},
}


def known_module_kinds(config: dict[str, Any]) -> dict[str, str] | None:
    """{module name: kind} of a causal LM from its config.json alone, or None when its family is not known."""
    extra = KNOWN_MODULE_LAYOUTS.get(config.get("model_type", ""))
    layers = config.get("num_hidden_layers")
    if extra is None or not isinstance(layers, int) or layers < 1:
        return None
    kinds = dict(_TOP_MODULES)
    for i in range(layers):
        kinds[f"model.layers.{i}"] = "other"
        for name, kind in {**_LAYER_MODULES, **extra}.items():
            kinds[f"model.layers.{i}.{name}"] = kind
    return kinds


def meta_module_kinds(model_dir: str | Path, trust_remote_code: bool = False) -> dict[str, str]:
    """{module name: kind} of the model a folder's config.json describes, built on the meta device (no weights
    read, no memory): for families `known_module_kinds` does not know."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return module_kinds(model)


def module_kinds(model) -> dict[str, str]:
    import torch

    def kind(module) -> str:
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            return "linear"
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return "conv"
        return "other"

    return {name: kind(module) for name, module in model.named_modules() if name}


def check_target_modules(targets: list[str], kinds: dict[str, str], source: str) -> None:
    """StageError unless every `train.lora.target_modules` entry names a module LoRA can adapt, matched as
    peft matches a list (the whole name, or its end after a dot). peft itself fails only when no entry matches
    at all, so a misspelt entry next to good ones would silently leave those layers untuned."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name, kind in kinds.items() if kind != "other"})
    for target in targets:
        hits = [name for name in kinds if name == target or name.endswith("." + target)]
        if not hits:
            raise StageError(
                f"{source}: train.lora.target_modules: {target!r} names no module of the model; "
                f"expected names of its linear layers ({', '.join(leaves)})"
            )
        bad = sorted({name for name in hits if kinds[name] == "other"})
        if bad:
            raise StageError(
                f"{source}: train.lora.target_modules: {target!r} names {bad[0]}, which is not a layer LoRA can "
                f"adapt (a container or a norm); expected names of its linear layers ({', '.join(leaves)})"
            )


def base_module_kinds(base_dir: str | Path, trust_remote_code: bool = False) -> dict[str, str]:
    """The module kinds of the model in `base_dir` from its config.json: the known layout, or the meta model."""
    import json

    config_path = Path(base_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StageError(f"{config_path}: unreadable model config ({type(err).__name__}: {err})") from None
    known = known_module_kinds(config)
    return known if known is not None else meta_module_kinds(base_dir, trust_remote_code)
