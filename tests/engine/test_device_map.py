"""Models placed by a device_map (accelerate's big-model dispatch) and offloaded to the CPU or disk give
what the unsplit model gives; the load options and the CLI's --device / --dtype / --device-map flags
refuse bad values with one clear line."""

import accelerate
import numpy as np
import pytest
import torch
from PIL import Image

import vlmprune
from conftest import FAMILIES, build_model, make_batch
from vlmprune.cli import main
from vlmprune.models.base import offload_hook, onloaded

DISK_LAYERS = (1, 3, 5)  # layer 1: FastV at layer 2 reads its attention rows
CPU_OFFLOADED_LAYER = 4  # offloaded after loading with accelerate.cpu_offload (weights in a CPU map)
STEPS = 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> a directory holding that family's tiny model (safetensors)."""
    root = tmp_path_factory.mktemp("device_map")
    dirs = {}

    def get(family: str):
        if family not in dirs:
            dirs[family] = root / family
            build_model(family).save_pretrained(dirs[family])
        return dirs[family]

    return get


def device_map(model, disk_layers=DISK_LAYERS, vision="disk") -> dict:
    """Every top-level piece by name: the vision side on `vision`, the decoder layers in `disk_layers`
    and the LM head on disk, everything else on the CPU."""
    out = {}
    for name, child in model.model.named_children():
        if name != "language_model":
            out[f"model.{name}"] = vision
            continue
        for sub, module in child.named_children():
            if sub == "layers":
                out.update({f"model.language_model.layers.{i}": "disk" if i in disk_layers else "cpu" for i in range(len(module))})
            else:
                out[f"model.language_model.{sub}"] = "cpu"
    out.update({f"model.{name}": "cpu" for name, _ in model.model.named_parameters(recurse=False)})  # LLaVA-NeXT's image_newline
    out["lm_head"] = "disk"
    return out


def offloaded(saved, family, tmp_path):
    """The family's model with layers on disk, one layer CPU-offloaded, and its unsplit reference."""
    path = saved(family)
    ref = vlmprune.load(path)
    pm = vlmprune.load(path, device_map=device_map(ref.model), offload_folder=tmp_path / "offload")
    accelerate.cpu_offload(pm.adapter.decoder.layers[CPU_OFFLOADED_LAYER], execution_device=torch.device("cpu"))
    return ref, pm


def _decisions():
    return {
        "none": lambda: None,
        "fastv+skip": lambda: [vlmprune.FastV(layer=2, keep=0.25), vlmprune.Plan(skip=[4])],
        "visionzip": lambda: vlmprune.VisionZip(keep=0.5),
    }


def _same(ref, pm, family, prune):
    batch = make_batch(family, ref.model, [3, 6], [4, 2])
    want = ref(**batch.kwargs(), prune=prune())
    got = pm(**batch.kwargs(), prune=prune())
    valid = want.token_index >= 0
    assert torch.equal(got.token_index, want.token_index)
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=1e-5, rtol=0)
    assert torch.equal(got.stats.tokens, want.stats.tokens) and torch.equal(got.stats.kv_entries, want.stats.kv_entries)
    assert torch.equal(got.stats.score_rows, want.stats.score_rows) and torch.equal(got.stats.layers_run, want.stats.layers_run)
    want_ids = ref.generate(**batch.kwargs(), prune=prune(), max_new_tokens=STEPS, eos_token_id=())
    got_ids = pm.generate(**batch.kwargs(), prune=prune(), max_new_tokens=STEPS, eos_token_id=())
    assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("decision", list(_decisions()))
@pytest.mark.parametrize("family", FAMILIES)
def test_disk_and_cpu_offload_equal_the_unsplit_model(saved, tmp_path, family, decision):
    ref, pm = offloaded(saved, family, tmp_path)
    layers = pm.adapter.decoder.layers
    for i in (*DISK_LAYERS, CPU_OFFLOADED_LAYER):  # really offloaded: the weights wait on the meta device
        assert layers[i].self_attn.q_proj.weight.device.type == "meta"
    assert pm.model.lm_head.weight.device.type == "meta" and "disk" in pm.model.hf_device_map.values()
    _same(ref, pm, family, _decisions()[decision])


def test_auto_device_map_with_max_memory_offloads_to_disk(saved, tmp_path):
    path = saved("llava")
    ref = vlmprune.load(path)
    size = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    pm = vlmprune.load(path, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "offload")
    placed = pm.model.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    assert pm.input_device == torch.device("cpu")
    for decision in ("none", "fastv+skip"):
        _same(ref, pm, "llava", _decisions()[decision])


def test_onloaded_materialises_offloaded_weights_for_direct_use(saved, tmp_path):
    ref, pm = offloaded(saved, "llava", tmp_path)
    for i in (1, CPU_OFFLOADED_LAYER):  # disk offload (device_map) and CPU offload (cpu_offload)
        q = pm.adapter.decoder.layers[i].self_attn.q_proj
        want = ref.adapter.decoder.layers[i].self_attn.q_proj
        x = torch.randn(2, 3, q.in_features)
        assert offload_hook(q) is not None and q.weight.device.type == "meta"
        with onloaded(q):
            assert torch.equal(q.weight, want.weight)
            assert torch.equal(q(x), want(x)) and torch.equal(q(x), want(x))  # calls inside keep the weights
            assert q.weight.device.type == "cpu"
        assert q.weight.device.type == "meta"
        assert torch.equal(q(x), want(x))  # the hook works as before


def test_placement_of_plain_and_dispatched_models(saved, tmp_path, tiny_models):
    plain = vlmprune.wrap(tiny_models("qwen2_vl")).adapter.placement()
    assert not plain.split and plain.input == torch.device("cpu") and set(plain.layers) == {torch.device("cpu")}
    _, pm = offloaded(saved, "qwen2_vl", tmp_path)
    place = pm.adapter.placement()  # offloaded layers compute on the hooks' execution device
    assert set(place.layers) == {torch.device("cpu")} and place.head == torch.device("cpu")
    assert pm.adapter.placement() is place  # worked out once
    assert pm.devices == (torch.device("cpu"),)


def test_offloading_a_tensor_no_hook_loads_is_refused(saved, tmp_path):
    path = saved("llava_next")
    dm = device_map(vlmprune.load(path).model, vision="cpu")
    dm["model.image_newline"] = "disk"  # a parameter directly on the model: no module's forward would load it
    with pytest.raises(vlmprune.VlmpruneError, match="image_newline.*map it to a device"):
        vlmprune.load(path, device_map=dm, offload_folder=tmp_path / "offload")


def test_weight_pruning_refuses_offloaded_weights(saved, tmp_path):
    from vlmprune.weights import load_for_pruning

    path = saved("llava")
    dm = device_map(vlmprune.load(path).model)
    with pytest.raises(vlmprune.VlmpruneError, match="weight pruning cannot run on offloaded weights"):
        load_for_pruning(path, device_map=dm, offload_folder=tmp_path / "offload")
    model, _ = load_for_pruning(path, device="cpu", dtype="bfloat16")  # one device: fine
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(device="gpu"), "device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu'"),
        (dict(device=3), "device must be"),
        (dict(dtype="int8"), "dtype must be 'bfloat16', 'float16', 'float32' or 'auto', got 'int8'"),
        (dict(dtype=torch.int64), "floating-point"),
        (dict(device="cpu", device_map="auto"), "either device .* or device_map .*, not both"),
        (dict(device_map="everywhere"), "device_map must be one of auto"),
        (dict(device_map=["cpu"]), "device_map must be 'auto' or a dict"),
        (dict(device_map={"lm_head": "gpu"}), "'lm_head': 'gpu' is not a device"),
        (dict(device_map={"": "disk"}), "give offload_folder"),
        (dict(max_memory={"cpu": "1GiB"}), "max_memory and offload_folder shape a device_map"),
        (dict(device_map="auto", max_memory="1GiB"), "max_memory must be a dict"),
    ],
)
def test_bad_load_options_are_refused_before_reading(tmp_path, options, message):
    with pytest.raises(vlmprune.VlmpruneError, match=message):
        vlmprune.load(tmp_path / "not-read", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(vlmprune.VlmpruneError, match="no CUDA GPU is available"):
            vlmprune.load(tmp_path / "not-read", device=device)
    with pytest.raises(vlmprune.VlmpruneError, match="no CUDA GPU is available"):
        vlmprune.load(tmp_path / "not-read", device_map={"": 0})


def test_dtype_names_and_the_auto_device():
    from vlmprune.loading import load_options, resolve_device, resolve_dtype

    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto") == "auto" and resolve_dtype(torch.float32) is torch.float32
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert load_options(device="cpu", dtype="float32") == {"dtype": torch.float32, "device_map": {"": "cpu"}}
    assert load_options(device_map="auto", offload_folder="off") == {"dtype": "auto", "device_map": "auto", "offload_folder": "off"}


COMMANDS = {
    "generate": lambda m, out: ["generate", "--model", m, "--prompt", "hi"],
    "eval": lambda m, out: ["eval", "--model", m],
    "sweep": lambda m, out: ["sweep", "--model", m, "--methods", "fastv", "--keep", "0.5", "--out", out],
    "prune-weights": lambda m, out: ["prune-weights", "--model", m, "--out", out],
    "router train": lambda m, out: ["router", "train", "--model", m, "--out", out],
}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "gpu"], "device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"),
        (["--dtype", "float64"], "dtype must be 'bfloat16', 'float16', 'float32' or 'auto'"),
        (["--device", "cpu", "--device-map", "auto"], "not both"),
        (["--device-map", "everywhere"], "device_map must be one of auto"),
    ],
)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_device_flags_refuse_bad_values_with_one_line(tmp_path, capsys, command, flags, message):
    argv = COMMANDS[command](str(tmp_path / "no-model"), str(tmp_path / "out")) + flags
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmprune: error: ") and "\n" not in err and message in err, err


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from vlmprune.testbed.recipe import random_checkpoint

    root = tmp_path_factory.mktemp("recipe")
    image = root / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((84, 84)) * 255).astype("uint8")).save(image)
    return random_checkpoint(root / "model", seed=1), image


@pytest.mark.parametrize("flags", [["--device", "auto", "--dtype", "bfloat16"], ["--device-map", "auto", "--dtype", "float32"]])
def test_cli_generate_with_device_flags(recipe, capsys, flags):
    model, image = recipe
    argv = ["generate", "--model", str(model), "--image", str(image), "--prompt", "user : <image> what is in the image ? assistant :",
            "--method", "fastv", "--keep", "0.25", "--max-new-tokens", "2", *flags]
    assert main(argv) == 0
    assert "layers run 8/8" in capsys.readouterr().out


def test_sweep_load_options(recipe, tmp_path):
    from vlmprune.eval.sweep import _check_load_options, _dtype_suffix

    model, _ = recipe
    assert _dtype_suffix(_check_load_options(str(model), {"dtype": "bf16", "device": None})) == ":bfloat16"
    assert _dtype_suffix(_check_load_options(str(model), {"dtype": "auto"})) == ""
    with pytest.raises(vlmprune.VlmpruneError, match="already loaded"):
        _check_load_options(vlmprune.load(model), {"dtype": "bfloat16"})
    with pytest.raises(vlmprune.VlmpruneError, match="unknown load_options"):
        _check_load_options(str(model), {"precision": "bf16"})
