"""Every dataset a command reads (issue 17): JSONL rows, an image folder with one prompt, Hugging Face
`datasets`, FashionScenes (``testbed``), and text for text-only LMs; prompts in the checkpoint's own
chat template; batches for calibration, router training and evaluation."""

from .batches import encode_examples, example_batches, image_channels
from .examples import Example, take
from .images import conform_image, read_image
from .prompts import chat_prompt
from .sources import read_examples, read_folder, read_hf, read_jsonl, read_texts, scene_examples

__all__ = [
    "Example",
    "chat_prompt",
    "conform_image",
    "encode_examples",
    "example_batches",
    "image_channels",
    "read_examples",
    "read_folder",
    "read_hf",
    "read_image",
    "read_jsonl",
    "read_texts",
    "take",
    "scene_examples",
]
