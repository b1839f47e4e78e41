"""Phantom: the embedded synthetic radiology-like VQA benchmark (registry name `phantom`).

Imaging phantoms are the synthetic test objects of medical imaging. This one is procedural: each
image is a *scene* — modality (ct, mri, x-ray), body region (head, chest, abdomen), plane (axial,
coronal), organs drawn as shapes, 0–3 lesions in distinct quadrants (upper/lower × left/right, as
seen in the image) with a size — rendered to a grayscale PNG with numpy + pillow, deterministic
from a seed. Questions come from a small grammar with three paraphrases per slot; the grammar
parses back (`parse_question`) and answers itself from any scene (`answer_for`), so a judge can
decide any question of the grammar about any image, and refuses (None) what it cannot decide.

One module per concern: `taxonomy` (the words and `PhantomConfig`), `scenes`, `render`, `grammar`
(questions, answers, captions: all the Phantom expert needs), `files` (writer and readers) and
`benchmark` (the registered `Phantom`). Their public names are re-exported here.

On disk (`write_phantom(out_dir, config)`):

    phantom.json                      generator version, config, counts
    {split}/images/{image_id}.png     the images
    {split}/scenes.jsonl              one scene record per image (the ground truth of everything)
    {split}/samples.jsonl             one `VQASample.to_json()` per line, image paths relative to the root
    {split}/captions.jsonl            {"image_id", "image", "caption"}: one sentence per image

Top-level imports are light (stdlib only): the CLI derives its flags from `PhantomConfig` at
start-up. numpy and pillow are imported inside the functions that draw.
"""

from medvqa.benchmarks.phantom.benchmark import Phantom
from medvqa.benchmarks.phantom.files import (
    data_key,
    load_captions,
    load_scenes,
    read_manifest,
    scenes_by_image,
    write_phantom,
)
from medvqa.benchmarks.phantom.grammar import (
    SLOTS,
    SLOTS_BY_NAME,
    ParsedQuestion,
    Slot,
    all_questions,
    answer_for,
    answer_matches,
    caption_for,
    corpus_texts,
    normalize_answer,
    normalize_question,
    parse_question,
    render_question,
    sample_questions,
)
from medvqa.benchmarks.phantom.render import render_scene
from medvqa.benchmarks.phantom.scenes import Lesion, Scene, sample_scene
from medvqa.benchmarks.phantom.taxonomy import (
    COUNT_WORDS,
    GENERATOR_VERSION,
    MODALITIES,
    ORGANS,
    PLANES,
    QUADRANT_ORGAN,
    QUADRANTS,
    REGION_ORGANS,
    REGIONS,
    SIDES,
    SIZES,
    SPLITS,
    PhantomConfig,
)

__all__ = [
    "COUNT_WORDS",
    "GENERATOR_VERSION",
    "MODALITIES",
    "ORGANS",
    "PLANES",
    "QUADRANTS",
    "QUADRANT_ORGAN",
    "REGIONS",
    "REGION_ORGANS",
    "SIDES",
    "SIZES",
    "SLOTS",
    "SLOTS_BY_NAME",
    "SPLITS",
    "Lesion",
    "ParsedQuestion",
    "Phantom",
    "PhantomConfig",
    "Scene",
    "Slot",
    "all_questions",
    "answer_for",
    "answer_matches",
    "caption_for",
    "corpus_texts",
    "data_key",
    "load_captions",
    "load_scenes",
    "normalize_answer",
    "normalize_question",
    "parse_question",
    "read_manifest",
    "render_question",
    "render_scene",
    "sample_questions",
    "sample_scene",
    "scenes_by_image",
    "write_phantom",
]
