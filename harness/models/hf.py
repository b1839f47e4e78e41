"""The `hf:` adapter: any transformers image-text-to-text checkpoint (+ an optional PEFT adapter).

`AutoModelForImageTextToText` + `AutoProcessor` load the model (LLaVA-1.5/1.6, LLaVA-Med in HF
format, Idefics3, the tiny Phantom LLaVA, ...). A PEFT adapter is applied without merging, so the
base weights stay as they are. `trust_remote_code` is off unless the spec says
`trust_remote_code=1`.

Prompts: `Prompt.messages` go through the processor's chat template (so each model gets its own
format); `Prompt.text` (a published raw convention with one `<image>`) is used verbatim.
Trainers build their inputs with `render_prompt_text` / `encode` so train and eval formats match.

Batched greedy generation pads on the LEFT and gives the same text as batch size 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.models import spec_flag
from medvqa.registry import models
from medvqa.types import GenerationRequest, GenerationSettings, Prompt

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
)
# Weight files up to this size are content-hashed; larger ones by size + mtime + head/tail hash.
FULL_HASH_LIMIT = 256 * 1024 * 1024
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Vision encoders whose batch rows are independent images (`_each_image_once`): the towers of
# LLaVA-1.5/1.6 and LLaVA-Med (CLIP), PaliGemma, Gemma 3 and LLaVA-OneVision (SigLIP).
PER_IMAGE_VISION_ENCODERS = ("clip_vision_model", "siglip_vision_model")


def _looks_like_path(target: str) -> bool:
    return (
        target.startswith(("/", "./", "../", "~", "."))
        or target.count("/") > 1
        or "\\" in target
        or (os.sep != "/" and os.sep in target)
    )


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if st.st_size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(fh.read(1 << 20))
        fh.seek(-(1 << 20), os.SEEK_END)
        h.update(fh.read(1 << 20))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def folder_fingerprint(folder: str | Path) -> dict[str, str]:
    """{file name: digest} of the config and weight files of a model or adapter folder.

    Only the folder's own files count (what `from_pretrained` reads): trainer sub-folders such as
    `checkpoint-500/` do not change the loaded model.
    """
    folder = Path(folder)
    out: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if (
            path.name in CONFIG_FILES
            or path.name.endswith(WEIGHT_SUFFIXES)
            or path.name.endswith(".index.json")
        ):
            out[path.name] = _file_digest(path)
    return out


def _hub_folder(target: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a cached hub model, if there is one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(target, "config.json", revision=revision)
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_model_dir(target: str) -> tuple[str | Path, Path | None]:
    """(the base model folder or hub id, an adapter folder when `target` itself is a PEFT adapter)."""
    path = Path(target).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput("model path is a file; expected a model folder", path=path, field="--model")
        if (path / "config.json").is_file():
            return path, None
        if (path / "adapter_config.json").is_file():
            cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise BadInput(
                    "adapter folder does not name its base model; use hf:BASE,adapter=DIR",
                    path=path / "adapter_config.json",
                    field="base_model_name_or_path",
                )
            base_dir, _ = resolve_model_dir(str(base))
            return base_dir, path
        raise BadInput(
            "not a model folder (no config.json or adapter_config.json)", path=path, field="--model"
        )
    if _looks_like_path(target):
        raise BadInput("model path does not exist", path=path, field="--model")
    return target, None  # a hub id


def default_dtype(device: str | None) -> tuple[str, str]:
    """(device, dtype name) defaults: cuda when available; float32 on CPU, the checkpoint's on GPU."""
    import torch

    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, ("float32" if torch.device(device).type == "cpu" else "auto")


def model_fingerprint(
    model_dir: str | Path, adapter_dir: Path | None, dtype: str, revision: str | None = None
) -> str:
    """Hash of the base model's config + weight files (+ the adapter's), and the dtype."""
    base_dir = Path(model_dir) if Path(model_dir).is_dir() else _hub_folder(str(model_dir), revision)
    ident: dict[str, Any] = {
        "base": folder_fingerprint(base_dir) if base_dir else {"hub_id": str(model_dir)},
        "revision": revision,
        "dtype": dtype,
    }
    if adapter_dir is not None:
        ident["adapter"] = folder_fingerprint(adapter_dir)
    blob = json.dumps(ident, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def render_prompt_text(processor: Any, prompt: Prompt) -> str:
    """The exact text fed to the processor for `prompt` (before `<image>` expansion).

    Chat messages are rendered with the processor's chat template and a generation prompt;
    raw text is returned verbatim. Trainers append the target answer to this string.
    """
    if prompt.text is not None:
        return prompt.text
    if not prompt.messages:
        raise ValueError("a Prompt needs messages or text")
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    if not template:
        raise BadInput(
            f"the model's processor has no chat template, so prompt policy {prompt.policy!r} "
            "(chat messages) cannot be rendered; use a raw-text policy (e.g. --prompt-policy llava-med-v1.5)",
            field="chat_template",
        )
    return processor.apply_chat_template(
        [dict(m) for m in prompt.messages], add_generation_prompt=True, tokenize=False
    )


def _policy_stops(requests: Sequence[GenerationRequest]) -> tuple[str, ...]:
    """The stop strings of the prompt policies in a batch (published separators such as '###')."""
    from medvqa.prompts import get_policy

    stops: set[str] = set()
    for name in {r.prompt.policy for r in requests if r.prompt.policy}:
        try:
            stops.update(getattr(get_policy(name), "stop", ()) or ())
        except BadInput:  # a prompt built outside the registry: no stops
            continue
    return tuple(sorted(stops))


def adds_special_tokens(prompt: Prompt) -> bool:
    """Whether the tokenizer should add its BOS: a chat template writes its own, raw text does not."""
    return prompt.text is not None


def load_image(image: str | bytes, *, record: object = None) -> Any:
    """Decode an image (path or bytes) to RGB; a file that does not decode is a BadInput."""
    from PIL import Image, UnidentifiedImageError

    where = image if isinstance(image, str) else "<image bytes>"
    try:
        if isinstance(image, bytes):
            img = Image.open(io.BytesIO(image))
        else:
            img = Image.open(image)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise BadInput("image file not found", path=where, record=record, field="image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"image does not decode ({exc})", path=where, record=record, field="image") from None


def _repeated_rows(requests: Sequence[GenerationRequest]) -> list[int] | None:
    """For each request, the first one with the same image and prompt (then the same model inputs);
    None when no two are the same (or a prompt is not plain JSON)."""
    first: dict[Hashable, int] = {}
    rows = []
    for i, r in enumerate(requests):
        try:
            prompt = (
                r.prompt.text if r.prompt.text is not None else json.dumps(r.prompt.messages, sort_keys=True)
            )
        except (TypeError, ValueError):
            return None
        rows.append(first.setdefault((r.image, prompt), i))
    return rows if len(first) < len(rows) else None


def _sampled_repeats(requests: Sequence[GenerationRequest], settings: GenerationSettings) -> list[int] | None:
    """`_repeated_rows` where n samples of one question are drawn (stage 2); None for greedy
    decoding, where a benchmark asks each question once and the search would cost ~1% of eval."""
    return _repeated_rows(requests) if settings.do_sample else None


def _decode_images(requests: Sequence[GenerationRequest]) -> list[Any]:
    """The batch's images, each distinct image decoded once (benchmarks ask several questions about
    one image; Phantom's test split 5, VQA-RAD's 11): a repeated image is the same PIL object."""
    decoded: dict[str | bytes, Any] = {}
    out = []
    for r in requests:
        image = decoded.get(r.image)
        if image is None:
            image = decoded[r.image] = load_image(r.image, record=r.id or None)
        out.append(image)
    return out


@contextmanager
def _each_image_once(tower: Any) -> Iterator[None]:
    """While it is held, `tower` (a per-image vision encoder) encodes each distinct image of its
    input once and repeats its output rows. Benchmarks ask several questions about one image
    (Phantom's test split 4-5, VQA-RAD's 11), and `generate` encodes one pixel row per question.
    Rows are told apart by value (`torch.unique`). The outputs are the same tensors (a test asserts
    it) for an encoder whose every output has one row per image (`PER_IMAGE_VISION_ENCODERS`)."""
    import torch

    inverse: list[tuple[Any, int]] = []  # (each input row's distinct row, how many distinct)

    def before(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if not torch.is_tensor(pixels) or pixels.ndim < 2 or len(pixels) < 2:
            return None
        try:
            distinct, rows = torch.unique(pixels.flatten(1), dim=0, return_inverse=True)
        except (RuntimeError, NotImplementedError):  # a dtype or device without unique rows
            return None
        if len(distinct) == len(pixels):
            return None
        inverse.append((rows, len(distinct)))
        distinct = distinct.view(len(distinct), *pixels.shape[1:])
        if args:
            return (distinct, *args[1:]), kwargs
        return args, {**kwargs, "pixel_values": distinct}

    def after(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not inverse:
            return None
        rows, n = inverse.pop()

        def repeat(value: Any) -> Any:
            if torch.is_tensor(value) and value.ndim and len(value) == n:
                return value.index_select(0, rows)
            if isinstance(value, tuple):
                return tuple(repeat(v) for v in value)
            return value

        if isinstance(output, tuple) and not hasattr(output, "keys"):
            return repeat(output)
        for key in list(output.keys()):
            output[key] = repeat(output[key])
        return output

    handles = [
        tower.register_forward_pre_hook(before, with_kwargs=True),
        tower.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _DistinctRows:
    """An image processor or tokenizer that processes each distinct item of a batch once and repeats
    its rows, so the output is the same tensors as processing every item (a test asserts it).

    Benchmarks ask several questions about one image and one question about many: a batch of 32
    Phantom questions holds ~7 images and ~12 prompt texts. `key` tells the items apart: the object
    for images (`_decode_images` gives a repeated image as the same one), the string for texts.
    Only where every output is a tensor with one row per item; anything else (lists of sizes, tiles
    counted per image...) is processed item by item as before. Padding to the batch's longest text
    or largest image (LLaVA-NeXT's patches) is unchanged: the distinct items are the same set.
    """

    def __init__(self, inner: Any, key: Callable[[Any], Hashable]):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "key", key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # a setting reaches the real one
        setattr(self.inner, name, value)

    def __call__(self, items: Any = None, *args: Any, **kwargs: Any) -> Any:
        import torch

        if not isinstance(items, list):
            return self.inner(items, *args, **kwargs)
        slots: dict[Hashable, int] = {}  # an item's key -> its row among the distinct items
        distinct: list[Any] = []
        index = []
        for item in items:
            key = self.key(item)
            if key not in slots:
                slots[key] = len(distinct)
                distinct.append(item)
            index.append(slots[key])
        if len(distinct) == len(items):
            return self.inner(items, *args, **kwargs)
        out = self.inner(distinct, *args, **kwargs)
        if not all(isinstance(v, torch.Tensor) and v.ndim and len(v) == len(distinct) for v in out.values()):
            return self.inner(items, *args, **kwargs)
        rows = torch.tensor(index)
        for name in list(out.keys()):
            out[name] = out[name].index_select(0, rows)
        if getattr(out, "_encodings", None) is not None:  # a fast tokenizer's per-row encodings
            out._encodings = [out._encodings[i] for i in index]
        return out


def _by_value(item: Any) -> Hashable:
    return item if isinstance(item, str) else id(item)


@models.register("hf")
class HFModel:
    """A transformers image-text-to-text model (+ optional PEFT adapter, not merged)."""

    def __init__(
        self,
        target: str,
        *,
        spec: str | None = None,
        adapter: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: Any = False,
        revision: str | None = None,
        attn_implementation: str | None = None,
    ):
        import torch

        self.target = target
        self.spec = spec or f"hf:{target}"
        self.trust_remote_code = spec_flag(trust_remote_code)
        self.revision = revision or None
        device, auto_dtype = default_dtype(device)
        self.device = torch.device(device)
        dtype = dtype or auto_dtype
        if dtype not in DTYPES:
            raise BadInput(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="--model")
        self.dtype_name = dtype

        self.model_dir, adapter_from_dir = resolve_model_dir(target)
        self.adapter_dir = Path(adapter).expanduser() if adapter else adapter_from_dir
        self.config = self._load_config()
        self.processor = self._load_processor()
        self.model = self._load_model(attn_implementation)
        if self.adapter_dir is not None:
            self._apply_adapter()
        self.model.eval()
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self._fingerprint: str | None = None

    # --- loading -----------------------------------------------------------------------------

    def _hub_error(self, exc: Exception) -> BadInput:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            return BadInput(
                f"hub model {self.model_dir!r} is not in the local cache and HF_HUB_OFFLINE is set "
                "(download it first, or give a local folder)",
                field="--model",
            )
        return BadInput(f"cannot load hub model {self.model_dir!r}: {first}", field="--model")

    def _load_processor(self) -> Any:
        from transformers import AutoProcessor

        source = self.model_dir
        if self.adapter_dir is not None and any(
            (self.adapter_dir / f).is_file() for f in ("processor_config.json", "tokenizer_config.json")
        ):
            source = self.adapter_dir  # a trainer may save the processor beside its adapter
        try:
            processor = AutoProcessor.from_pretrained(
                source, trust_remote_code=self.trust_remote_code, revision=self.revision
            )
        except OSError as exc:
            if Path(source).is_dir():
                raise BadInput(
                    f"cannot load a processor ({str(exc).splitlines()[0]})", path=source, field="--model"
                ) from None
            raise self._hub_error(exc) from None
        except ValueError as exc:
            raise BadInput(
                f"cannot load a processor ({str(exc).splitlines()[0]})", path=source, field="--model"
            ) from None
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise BadInput(
                f"not an image-text model: its processor is a {type(processor).__name__}, "
                "with no image processor and tokenizer",
                path=source,
                field="--model",
            )
        return processor

    def _load_config(self) -> Any:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        local = Path(self.model_dir) / "config.json"
        if local.is_file():
            try:
                model_type = str(json.loads(local.read_text(encoding="utf-8")).get("model_type", ""))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise BadInput("config.json is not a JSON object", path=local, field="--model") from None
            if model_type.startswith("llava_") or model_type == "llava_med":
                raise BadInput(
                    f"original-format LLaVA checkpoint (model_type {model_type!r}): convert it first with "
                    "`medvqa model convert-llava --src DIR --vision-tower CLIP --out NEW_DIR`",
                    path=local,
                    field="model_type",
                )
        try:
            config = AutoConfig.from_pretrained(
                self.model_dir, trust_remote_code=self.trust_remote_code, revision=self.revision
            )
        except OSError as exc:
            raise self._hub_error(exc) from None
        except ValueError as exc:
            raise BadInput(
                f"cannot read the model config ({str(exc).splitlines()[0]})",
                path=self.model_dir,
                field="--model",
            ) from None
        auto_map = getattr(config, "auto_map", None) or {}
        if (
            config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and "AutoModelForImageTextToText" not in auto_map
        ):
            raise BadInput(
                f"not an image-text model (model_type {config.model_type!r} has no "
                "AutoModelForImageTextToText class)",
                path=self.model_dir,
                field="--model",
            )
        return config

    def _load_model(self, attn_implementation: str | None) -> Any:
        import torch
        from transformers import AutoModelForImageTextToText

        kwargs: dict[str, Any] = {
            "trust_remote_code": self.trust_remote_code,
            "revision": self.revision,
            "dtype": self.dtype_name if self.dtype_name == "auto" else getattr(torch, self.dtype_name),
        }
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.model_dir, config=self.config, **kwargs)
        except OSError as exc:
            if Path(self.model_dir).is_dir():
                raise BadInput(
                    f"cannot load the weights ({str(exc).splitlines()[0]})",
                    path=self.model_dir,
                    field="--model",
                ) from None
            raise self._hub_error(exc) from None
        return model.to(self.device)

    def _apply_adapter(self) -> None:
        from peft import PeftModel

        adapter = self.adapter_dir
        assert adapter is not None
        if not (adapter / "adapter_config.json").is_file():
            raise BadInput(
                "adapter folder has no adapter_config.json"
                if adapter.exists()
                else "adapter folder does not exist",
                path=adapter,
                field="adapter",
            )
        try:
            self.model = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=False)
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise BadInput(
                f"adapter does not fit the base model {self.model_dir}: {msg}", path=adapter, field="adapter"
            ) from None
        self.model.to(self.device)

    # --- identity ----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def fingerprint(self) -> str:
        """Hash of the base model's config + weight files (+ the adapter's), and the dtype.

        A new checkpoint (different weights) always gets a new fingerprint.
        """
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(
                self.model_dir, self.adapter_dir, self.dtype_name, self.revision
            )
        return self._fingerprint

    @classmethod
    def spec_fingerprint(
        cls,
        target: str,
        *,
        adapter: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        revision: str | None = None,
        **_: Any,
    ) -> str:
        """The fingerprint a model loaded from this spec would have, without loading it."""
        model_dir, adapter_from_dir = resolve_model_dir(target)
        adapter_dir = Path(adapter).expanduser() if adapter else adapter_from_dir
        return model_fingerprint(model_dir, adapter_dir, dtype or default_dtype(device)[1], revision or None)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "model": str(self.model_dir),
            "adapter": str(self.adapter_dir) if self.adapter_dir else None,
            "dtype": self.dtype_name,
            "class": type(self.model).__name__,
        }

    # --- inputs and generation ---------------------------------------------------------------

    def encode(
        self,
        requests: Sequence[GenerationRequest],
        texts: Sequence[str] | None = None,
        *,
        rendered: dict[str, str] | None = None,
        on_device: bool = True,
    ) -> Any:
        """Processor inputs for a batch (left padding), on the model's device (on the CPU with
        `on_device=False`).

        `texts` overrides the rendered prompt strings (e.g. prompt + answer for scoring).
        `rendered`: the chat-template texts of earlier batches by prompt, filled as it goes (see
        `_render_texts`). Each distinct image and text of the batch is processed once, its rows
        repeated (`_DistinctRows`): the same tensors as processing every one. Not thread-safe: the
        processor's image processor and tokenizer are wrapped while it runs.
        """
        if not requests:
            raise ValueError("empty batch")
        kinds = {adds_special_tokens(r.prompt) for r in requests}
        if len(kinds) > 1:
            raise ValueError("a batch mixes chat-message and raw-text prompts")
        images = _decode_images(requests)
        if texts is None:
            texts = self._render_texts(requests, rendered)
        processor = self.processor
        image_processor, tokenizer = processor.image_processor, processor.tokenizer
        # each distinct image and text processed once: the same tensors (see _DistinctRows)
        processor.image_processor = _DistinctRows(image_processor, id)
        processor.tokenizer = _DistinctRows(tokenizer, _by_value)
        try:
            inputs = processor(
                images=images,
                text=list(texts),
                return_tensors="pt",
                padding=True,
                add_special_tokens=kinds.pop(),
            )
        finally:
            processor.image_processor, processor.tokenizer = image_processor, tokenizer
        return inputs.to(self.device) if on_device else inputs

    def _render_texts(
        self, requests: Sequence[GenerationRequest], rendered: dict[str, str] | None = None
    ) -> list[str]:
        """Each prompt's text, each distinct chat prompt rendered once per batch, or once per stream
        of batches with `rendered` (benchmarks ask one question of many images: Phantom's 128 test
        questions are 45 texts). Keyed by the messages as JSON, so only an equal prompt hits."""
        rendered = {} if rendered is None else rendered
        out = []
        for r in requests:
            if r.prompt.text is not None:
                out.append(r.prompt.text)
                continue
            try:
                key = json.dumps(r.prompt.messages, ensure_ascii=False)
            except (TypeError, ValueError):  # not plain JSON: render it as it is, uncached
                out.append(render_prompt_text(self.processor, r.prompt))
                continue
            text = rendered.get(key)
            if text is None:
                text = rendered[key] = render_prompt_text(self.processor, r.prompt)
            out.append(text)
        return out

    def _usable_stops(self, stops: tuple[str, ...]) -> tuple[str, ...]:
        """`stops` if transformers' StopStringCriteria works with this tokenizer, else () (an
        optimisation only: the policy still cuts the answer at its stop string)."""
        if not stops:
            return ()
        cache = self.__dict__.setdefault("_stops_ok", {})
        if stops not in cache:
            from transformers import StopStringCriteria

            try:
                StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stops))
                cache[stops] = True
            except (ValueError, KeyError, IndexError):  # e.g. word-level vocabularies
                cache[stops] = False
        return stops if cache[stops] else ()

    def prepare(
        self, requests: Sequence[GenerationRequest], *, rendered: dict[str, str] | None = None
    ) -> Any:
        """The model inputs of a batch: images decoded, prompts rendered and tokenized, on the device."""
        return self._to_model(self._prepare_on_cpu(requests, rendered=rendered))

    def _prepare_on_cpu(
        self, requests: Sequence[GenerationRequest], *, rendered: dict[str, str] | None = None
    ) -> Any:
        """`prepare` up to the device: what a forked worker may do (it must not touch a GPU)."""
        return self.encode(requests, rendered=rendered, on_device=False)

    def _to_model(self, inputs: Any) -> Any:
        """Prepared CPU inputs on the model's device, pixels in its dtype."""
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _stop_criteria(self, stops: tuple[str, ...]) -> list[Any]:
        """transformers' StopStringCriteria for `stops`, built once (it reads the tokenizer's vocabulary)."""
        cache = self.__dict__.setdefault("_stop_criteria_cache", {})
        if stops not in cache:
            from transformers import StopStringCriteria

            cache[stops] = [StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stops))]
        return cache[stops]

    def _gen_kwargs(
        self, requests: Sequence[GenerationRequest], settings: GenerationSettings
    ) -> dict[str, Any]:
        import torch

        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        seeds = [r.seed for r in requests]
        if settings.do_sample and all(s is not None for s in seeds):
            # one generator per request: each sample is independent of its batch (models/sampling.py)
            from medvqa.models.sampling import seeded_sampler

            sampler = seeded_sampler(seeds, settings.temperature, settings.top_p)
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            gen_kwargs["logits_processor"] = [sampler]
        elif settings.do_sample:
            gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            torch.manual_seed(settings.seed)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        stops = self._usable_stops(_policy_stops(requests))
        if stops:  # stop each sequence at its convention's separator (the policy cuts the text there)
            gen_kwargs["stopping_criteria"] = self._stop_criteria(stops)
        return gen_kwargs

    def _generate_tokens(
        self, inputs: Any, gen_kwargs: dict[str, Any], same_as: Sequence[int] | None = None
    ) -> Any:
        """The new tokens only (the model's own work: no tokenizer, no image code).

        `same_as[i]`: the first row with row i's image and prompt (`_repeated_rows`). Rows that
        repeat one (n sampled answers to one question) share one prefill: the prompt minus its
        last token runs once per distinct row and its cache is copied to the repeats, then the
        whole batch generates from there (the same tokens: seeded sampling draws each row from
        its own generator). Where the inputs are not one row per request (e.g. Qwen2-VL's
        flattened patches) or the model returns no reorderable cache, every row prefills.
        """
        import torch

        tower = self._per_image_vision_tower()
        with _each_image_once(tower) if tower is not None else nullcontext():
            cache = self._shared_prefill(inputs, same_as) if same_as is not None else None
            with torch.inference_mode():
                if cache is None:
                    out = self.model.generate(**inputs, **gen_kwargs)
                else:  # the image is in the cache: the rest of the prompt is text
                    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
                    out = self.model.generate(**text, **{self._cache_kwarg(): cache}, **gen_kwargs)
        return out[:, inputs["input_ids"].shape[1] :]

    def _per_image_vision_tower(self) -> Any:
        """The model's `vision_tower` where it is a per-image encoder (`PER_IMAGE_VISION_ENCODERS`),
        else None: generation then encodes each distinct image of a batch once (`_each_image_once`)."""
        if "_vision_tower" not in self.__dict__:
            vision = getattr(self.config, "vision_config", None)
            tower = None
            if getattr(vision, "model_type", None) in PER_IMAGE_VISION_ENCODERS:
                tower = next(
                    (
                        m
                        for name, m in self.model.named_modules()
                        if name.rsplit(".", 1)[-1] == "vision_tower"
                    ),
                    None,
                )
            self.__dict__["_vision_tower"] = tower
        return self.__dict__["_vision_tower"]

    def _cache_kwarg(self) -> str:
        """`cache` (transformers >= 5.2x) or `past_key_values` (earlier 5.x): the name `generate` takes."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _shared_prefill(self, inputs: Any, same_as: Sequence[int]) -> Any:
        """The batch's cache after all but the last prompt token, each distinct row computed once;
        None where sharing does not apply (see `_generate_tokens`)."""
        import torch

        n = inputs["input_ids"].shape[0]
        distinct = sorted(set(same_as))
        if (
            len(distinct) == n
            or inputs["input_ids"].shape[1] < 2
            or getattr(self.model.config, "is_encoder_decoder", False)
            or any(torch.is_tensor(v) and (v.ndim == 0 or v.shape[0] != n) for v in inputs.values())
        ):
            return None
        rows = torch.tensor(distinct, device=inputs["input_ids"].device)
        prefix = {k: v[rows] if torch.is_tensor(v) else v for k, v in inputs.items()}
        for key in ("input_ids", "attention_mask"):
            prefix[key] = prefix[key][:, :-1]
        with torch.inference_mode():  # generate's own first step (positions, image features), one token
            out = self.model.generate(**prefix, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                      pad_token_id=self.tokenizer.pad_token_id, temperature=None, top_p=None,
                                      top_k=None)  # fmt: skip
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "reorder_cache"):
            return None
        index = {row: k for k, row in enumerate(distinct)}
        cache.reorder_cache(torch.tensor([index[r] for r in same_as], device=rows.device))
        return cache

    def _decode(self, new_tokens: Any) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings) -> list[str]:
        if not requests:
            return []
        inputs = self.prepare(requests)
        gen_kwargs = self._gen_kwargs(requests, settings)
        return self._decode(self._generate_tokens(inputs, gen_kwargs, _sampled_repeats(requests, settings)))

    def generate_many(
        self,
        batches: Iterable[Sequence[GenerationRequest]],
        settings: GenerationSettings,
        finish: Callable[[int, list[str]], Any] | None = None,
    ) -> Iterator[Any]:
        """`generate` over a stream of batches, preparing batch i+1 while the model answers batch i.

        Image decoding, prompt rendering and tokenization of the next batch run in a forked worker
        process (`prefetch.Prefetcher`: a thread would share the GIL with a small model's generate
        loop). A batch due while nothing generates (the first, the one after a failed batch) is
        prepared in this process: a hand-over would only add a round trip. Each distinct image of a
        batch is decoded and processed once, each distinct text tokenized once, and each distinct
        chat prompt rendered once per process (`encode`). A batch whose inputs fail (e.g. an image
        that does not decode) is yielded as its BadInput, and the stream goes on. Same answers as
        `generate` batch by batch.

        `finish(i, answers)`: what to yield for the stream's batch i instead of its answers. It runs
        in the worker too, with the decoding, while the model answers batch i+1 (an eval builds its
        answer rows there), so batch i's result comes once batch i+1 has generated. It runs in a
        fork: it sees what it closes over as it was when the stream started, and what it changes
        stays there.
        """
        from medvqa.models.prefetch import Prefetcher

        stream = enumerate(batches)
        rendered: dict[str, str] = {}  # the stream's prompt texts (the worker keeps its own copy)

        def prepare(batch: Sequence[GenerationRequest]) -> Any:
            return self._prepare_on_cpu(batch, rendered=rendered)

        def decode_and_finish(index: int, new_tokens: Any) -> Any:
            assert finish is not None
            return finish(index, self._decode(new_tokens))

        with Prefetcher(prepare, decode_and_finish if finish else None) as prefetch:

            def submit(*, now: bool) -> tuple[int, Sequence[GenerationRequest], Any] | None:
                index, batch = next(stream, (-1, None))
                if batch is None:
                    return None
                return index, batch, prefetch.here(batch) if now else prefetch.prepare(batch)

            finishing: deque[Any] = deque()  # finish jobs of generated batches, in order

            def finished(keep: int) -> Iterator[Any]:
                """The results of the finish jobs in hand but the last `keep`, in order."""
                while len(finishing) > keep:
                    yield prefetch.result(finishing.popleft())

            current = submit(now=True)
            while current is not None:
                index, batch, job = current
                try:
                    inputs = self._to_model(prefetch.result(job))
                except BadInput as exc:
                    current = submit(now=True)
                    yield from finished(0)
                    yield exc
                    continue
                upcoming = submit(now=False)
                gen_kwargs = self._gen_kwargs(batch, settings)
                new_tokens = self._generate_tokens(inputs, gen_kwargs, _sampled_repeats(batch, settings))
                if finish is None:
                    yield self._decode(new_tokens)
                else:
                    finishing.append(prefetch.finish(index, new_tokens))
                    yield from finished(1)
                current = upcoming
            yield from finished(0)
