"""StoryPipeline on what else shares the SD/SDXL UNet and loop: other attention processors (sliced,
math, IP-Adapter, PEFT LoRA), ControlNet pipelines, IP-Adapters; plus the tiny builders' RNG hygiene.

Every model is tiny and random, built here or by `storydiffusion.pipelines.tiny_random`.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DModel,
)
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from storydiffusion import CSAConfig, CSASchedule, StoryDiffusionError
from storydiffusion.csa.attention import ConsistentSelfAttnProcessor
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.pipelines.tiny_random import (
    seeded,
    tiny_sd_controlnet_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_controlnet_pipeline,
    tiny_sdxl_pipeline,
)

CHARACTERS = {"Bob": "a man with red hair, black suit"}
STORY = ["[Bob] at home", "[Bob] on a bus", "[Bob] sleeps"]  # 2 reference frames, then 1 reading the bank
RUN = dict(id_length=2, num_inference_steps=2, height=64, width=64, output_type="np", progress=False, seed=3)
ALWAYS = CSAConfig(schedule=CSASchedule.always())
OFF = CSAConfig(rate=0.0)
ATOL = 1e-4  # sliced / math attention against SDPA: float rounding only


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def story(pipe, config=ALWAYS, **kwargs):
    return StoryPipeline(pipe, config)(CHARACTERS, STORY, **(RUN | kwargs)).images


def plain(pipe, **kwargs):
    """The story's frames from the wrapped pipeline alone, called as StoryPipeline calls it (refs together)."""
    prompts = [f"{CHARACTERS['Bob']} {text.removeprefix('[Bob] ')}" for text in STORY]
    seed = RUN["seed"]
    common = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np", **kwargs)
    refs = pipe(prompts[:2], generator=[torch.Generator().manual_seed(seed + i) for i in (0, 1)], **common).images
    read = pipe(prompts[2:], generator=[torch.Generator().manual_seed(seed + 2)], **common).images
    return [*refs, *read]


def assert_same(a, b, atol=0.0):
    for x, y in zip(a, b, strict=True):
        if atol:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0)
        else:
            assert np.array_equal(x, y)


def differ(a, b, by=1e-4):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) > by


def half_image(top: bool) -> Image.Image:
    """A two-tone 64x64 image, top or left half white: structure a control image or image encoder can see."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    if top:
        pixels[:32] = 255
    else:
        pixels[:, :32] = 255
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------------------------
# 1. CSA calls the processor it replaced as Attention.forward would
# --------------------------------------------------------------------------------------------
class NoCSA:
    """A controller that never asks for CSA: every call goes to the wrapped processor."""

    def wants_csa(self, layer):
        return False


class Recorder:
    """A processor without temb (like SlicedAttnProcessor) and one named extra: records how it is called."""

    def __init__(self):
        self.calls = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, scale=1.0):
        self.calls.append(((attn, hidden_states), dict(encoder_hidden_states=encoder_hidden_states,
                                                       attention_mask=attention_mask, scale=scale)))  # fmt: skip
        return hidden_states


class CatchAll:
    """A processor with **kwargs: diffusers still passes it only the names its signature lists."""

    def __init__(self):
        self.kwargs = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.kwargs = dict(kwargs, temb=temb)
        return hidden_states


def test_original_is_called_with_keywords_and_only_what_it_takes():
    attn, tokens, temb = object(), torch.randn(2, 4, 8), torch.randn(2, 8)
    recorder = Recorder()
    wrapped = ConsistentSelfAttnProcessor("layer", 1, 0.5, NoCSA(), recorder)
    wrapped(attn, tokens, None, None, temb, scale=0.5, unknown=1)  # positional, as a caller might
    ((args, kwargs),) = recorder.calls
    assert args[0] is attn and args[1] is tokens and len(args) == 2
    assert kwargs == dict(encoder_hidden_states=None, attention_mask=None, scale=0.5)  # no temb, no unknown

    catch_all = CatchAll()
    ConsistentSelfAttnProcessor("layer", 1, 0.5, NoCSA(), catch_all)(attn, tokens, unknown=1)
    assert catch_all.kwargs == {"temb": None}  # temb not given: not passed; `unknown` is not a parameter name
    ConsistentSelfAttnProcessor("layer", 1, 0.5, NoCSA(), catch_all)(attn, tokens, temb=temb)
    assert catch_all.kwargs["temb"] is temb


def ip_attention(seed: int = 0) -> tuple[Attention, IPAdapterAttnProcessor2_0]:
    with seeded(seed):
        attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
        return attn, IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=16, num_tokens=(4,))


@pytest.mark.parametrize(
    "make", [AttnProcessor2_0, AttnProcessor, lambda: SlicedAttnProcessor(1), "ip_adapter"],
    ids=["sdpa", "math", "sliced", "ip_adapter"],
)  # fmt: skip
def test_wrapped_processor_gives_what_attention_forward_gives(make):
    if make == "ip_adapter":
        attn, original = ip_attention()
        text, ip_tokens = torch.randn(2, 7, 16), torch.randn(2, 4, 16)
        inputs = dict(encoder_hidden_states=(text, [ip_tokens]), scale=0.5)  # cross-attention: never CSA
    else:
        with seeded(0):
            attn, original = Attention(query_dim=32, heads=4, dim_head=8).eval(), make()
        inputs = {}
    tokens, temb = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        attn.set_processor(original)
        expected = attn(tokens, temb=temb, **inputs)
        attn.set_processor(ConsistentSelfAttnProcessor("layer", 1, 0.5, NoCSA(), original))
        assert torch.equal(attn(tokens, temb=temb, **inputs), expected)


@pytest.mark.parametrize(
    "install",
    [lambda pipe: pipe.enable_attention_slicing(), lambda pipe: pipe.unet.set_attn_processor(AttnProcessor())],
    ids=["sliced", "math"],
)
def test_story_runs_on_other_processors_with_the_same_math(install):
    default = quiet(tiny_sd_pipeline(seed=0))  # AttnProcessor2_0
    with_csa = story(default)
    pipe = quiet(tiny_sd_pipeline(seed=0))
    install(pipe)
    assert_same(story(pipe, OFF), plain(pipe))  # CSA off: exactly the processor's own images
    on = story(pipe)
    assert_same(on, with_csa, atol=ATOL)  # CSA on: the default processor's story, to float rounding
    assert differ(on[2], story(pipe, OFF)[2])  # the read frame really read the bank
    assert type(pipe.unet.attn_processors["up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]) in (
        SlicedAttnProcessor,
        AttnProcessor,
    )  # and the processors are back


def lora_pipe():
    peft = pytest.importorskip("peft")
    pipe = quiet(tiny_sd_pipeline(seed=0))
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with seeded(1):
        config.init_lora_weights = False  # random B too: a LoRA that changes the output
        pipe.unet.add_adapter(config)
    return pipe


def test_story_runs_on_a_peft_lora_unet():
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = lora_pipe()
    off = story(pipe, OFF)
    assert_same(off, plain(pipe))
    on = story(pipe)
    assert differ(on[2], off[2]) and differ(on[0], off[0])
    pipe.unet.disable_adapters()
    assert differ(story(pipe)[2], on[2])  # the LoRA mattered under CSA...
    pipe.unet.enable_adapters()
    for module in pipe.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    assert_same(story(pipe), on, atol=ATOL)  # ...and CSA's own projections were the LoRA'd ones


# --------------------------------------------------------------------------------------------
# 2. ControlNet pipelines
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["sd", "sdxl"])
def controlnet_pipe(request):
    return quiet(tiny_sd_controlnet_pipeline(seed=0) if request.param == "sd" else tiny_sdxl_controlnet_pipeline(0))


def test_controlnet_story_follows_the_control_image(controlnet_pipe):
    top, left = half_image(top=True), half_image(top=False)
    off_top = story(controlnet_pipe, OFF, image=top)
    assert_same(off_top, plain(controlnet_pipe, image=top))  # image= reaches the pipeline unchanged
    off_left = story(controlnet_pipe, OFF, image=left)
    assert all(differ(a, b) for a, b in zip(off_top, off_left))
    on_top = story(controlnet_pipe, image=top)
    assert differ(on_top[0], off_top[0]) and differ(on_top[2], off_top[2])

    # one control image per frame: frame i follows control_images[i] (without CSA the frames are independent)
    per_frame = story(controlnet_pipe, OFF, control_images=[top, left, left])
    assert_same(per_frame, [off_top[0], off_left[1], off_left[2]], atol=1e-5)
    on_per_frame = story(controlnet_pipe, control_images=[top, left, left])
    assert differ(on_per_frame[2], per_frame[2]) and differ(on_per_frame[2], on_top[2])


def test_multi_controlnet_takes_a_list_of_images_per_frame():
    base = tiny_sd_controlnet_pipeline(seed=0)
    pipe = quiet(StableDiffusionControlNetPipeline(**{**base.components, "controlnet": [base.controlnet] * 2}))
    top, left = half_image(top=True), half_image(top=False)
    shared = story(pipe, OFF, image=[top, left])
    per_frame = story(pipe, OFF, control_images=[[top, left], [left, left], [top, left]])  # the nets are equal
    assert_same([per_frame[0], per_frame[2]], [shared[0], shared[2]], atol=1e-5)
    assert differ(per_frame[1], shared[1])
    with pytest.raises(StoryDiffusionError, match=r"control_images\[0\] must be a list of 2 images"):
        story(pipe, control_images=[top] * 3)


def test_controlnet_inputs_are_checked(controlnet_pipe, sd_pipe):
    image = half_image(top=True)
    with pytest.raises(StoryDiffusionError, match="control_images has 2 images for 3 frames"):
        story(controlnet_pipe, control_images=[image, image])
    with pytest.raises(StoryDiffusionError, match="both image= .* and control_images="):
        story(controlnet_pipe, image=image, control_images=[image] * 3)
    with pytest.raises(StoryDiffusionError, match="needs a control image"):
        story(controlnet_pipe)
    with pytest.raises(StoryDiffusionError, match="one control image per frame"):
        story(controlnet_pipe, control_images=image)
    with pytest.raises(StoryDiffusionError, match="control_images= is a ControlNet's control image.*no controlnet"):
        story(sd_pipe, control_images=[image] * 3)
    with pytest.raises(StoryDiffusionError, match="image= is a ControlNet's control image"):
        story(sd_pipe, image=image)


# --------------------------------------------------------------------------------------------
# 2. IP-Adapter
# --------------------------------------------------------------------------------------------
def save_tiny_ip_adapter(folder, unet, seed: int = 0, embed_dim: int = 16) -> str:
    """A random IP-Adapter in the layout `load_ip_adapter` reads: `image_encoder/` (CLIP vision with
    projection) and one weight file of `image_proj.*` (ImageProjection: 4 tokens) and `ip_adapter.*`
    (per cross-attention layer, numbered 1, 3, 5, ... in processor order, its to_k_ip / to_v_ip)."""
    with seeded(seed):
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8, projection_dim=embed_dim)
        )  # fmt: skip
        encoder.save_pretrained(folder / "image_encoder")
        cross = unet.config.cross_attention_dim
        tensors = {
            "image_proj.proj.weight": torch.randn(4 * cross, embed_dim),
            "image_proj.proj.bias": torch.zeros(4 * cross),
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross),
        }
        layers = [name.removesuffix(".processor") for name in unet.attn_processors if ".attn2." in name]
        for number, layer in zip(range(1, 2 * len(layers), 2), layers):
            to_k = unet.get_submodule(layer).to_k
            for key in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{number}.{key}.weight"] = torch.randn(to_k.out_features, to_k.in_features) * 0.2
    save_file(tensors, folder / "ip-adapter.safetensors")
    return "ip-adapter.safetensors"


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_ip_adapter_story(make, tmp_path):
    pipe = quiet(make(seed=0))
    without = story(pipe, OFF)
    weight_name = save_tiny_ip_adapter(tmp_path, pipe.unet)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=weight_name)
    top, left = half_image(top=True), half_image(top=False)

    off_top = story(pipe, OFF, ip_adapter_image=top)  # the reference call has 2 frames: embeds repeated per prompt
    assert_same(off_top, plain(pipe, ip_adapter_image=top))
    assert all(differ(a, b) for a, b in zip(off_top, without))
    assert all(differ(a, b) for a, b in zip(off_top, story(pipe, OFF, ip_adapter_image=left)))
    on_top = story(pipe, ip_adapter_image=top)
    assert differ(on_top[0], off_top[0]) and differ(on_top[2], off_top[2])
    batched = StoryPipeline(pipe, ALWAYS)(
        CHARACTERS, [*STORY, "[Bob] reads"], ip_adapter_image=top, frame_batch_size=2, **RUN
    ).images  # the frame phase with 2 frames per call too
    assert len(batched) == 4 and differ(batched[2], batched[3])

    with pytest.raises(StoryDiffusionError, match="IP-Adapter loaded, which needs ip_adapter_image="):
        story(pipe)


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_a_character_picture_composes_with_an_ip_adapter(make, tmp_path):
    """The same picture as the character's bank and as the IP-Adapter's image: at adapter scale 0 the frames
    are exactly those of the picture alone (the adapter's processors leave the picture pass and CSA intact);
    at scale 1 the adapter acts in the picture pass too (another bank) and in the frames."""
    pipe = quiet(make(seed=0))
    picture = half_image(top=True)
    config = CSAConfig(schedule=CSASchedule.always(), reference_noise=0.0)

    def run(**kwargs):
        story_pipe = StoryPipeline(pipe, config, bank_dtype="float32")
        return story_pipe(CHARACTERS, STORY[1:], character_images={"Bob": [picture]}, **(RUN | kwargs))

    alone = run()
    weight_name = save_tiny_ip_adapter(tmp_path, pipe.unet)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=weight_name)
    pipe.set_ip_adapter_scale(0.0)
    neutral = run(ip_adapter_image=picture)
    assert_same(neutral.images, alone.images)
    pipe.set_ip_adapter_scale(1.0)
    both = run(ip_adapter_image=picture)
    assert all(differ(a, b) for a, b in zip(both.images, alone.images))
    up = next(key for key in both.banks["Bob"].keys() if key[1].startswith("up"))  # after cross-attention
    bank_with, bank_without = (
        out.banks["Bob"].get(*up, torch.float32, torch.device("cpu"), 2) for out in (both, alone)
    )
    assert not torch.allclose(bank_with, bank_without)  # the picture pass saw the adapter's image


# --------------------------------------------------------------------------------------------
# 2. What StoryPipeline refuses, and why
# --------------------------------------------------------------------------------------------
class NoUNetPipeline(DiffusionPipeline):
    def __init__(self):
        super().__init__()


def test_pipelines_that_cannot_work_are_refused_with_the_reason(sd_pipe):
    parts = {k: v for k, v in sd_pipe.components.items() if k != "image_encoder"}
    with pytest.raises(StoryDiffusionError, match="image-to-image.*AutoPipelineForText2Image.from_pipe"):
        StoryPipeline(StableDiffusionImg2ImgPipeline(**parts))
    with pytest.raises(StoryDiffusionError, match="inpainting"):
        StoryPipeline(StableDiffusionInpaintPipeline(**parts))
    with pytest.raises(StoryDiffusionError, match="no UNet2DConditionModel.*StableDiffusionControlNetPipeline"):
        StoryPipeline(NoUNetPipeline())
    with seeded(0):
        unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    with pytest.raises(StoryDiffusionError, match="DDPMPipeline has no UNet2DConditionModel"):
        StoryPipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    with pytest.raises(StoryDiffusionError, match="StableDiffusionXLControlNetPipeline"):
        StoryPipeline(sd_pipe.unet)


# --------------------------------------------------------------------------------------------
# 3. The tiny builders leave torch's global random state alone
# --------------------------------------------------------------------------------------------
def test_tiny_builders_keep_the_global_rng_and_are_seeded():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    sd, sd_again, sd_other = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    controlnet = tiny_sd_controlnet_pipeline(seed=0)
    tiny_sdxl_pipeline(seed=0)
    tiny_sdxl_controlnet_pipeline(seed=0)
    assert torch.equal(torch.get_rng_state(), before)

    weights = sd.unet.state_dict()
    assert all(torch.equal(v, sd_again.unet.state_dict()[k]) for k, v in weights.items())
    assert not all(torch.equal(v, sd_other.unet.state_dict()[k]) for k, v in weights.items())
    assert all(torch.equal(v, controlnet.unet.state_dict()[k]) for k, v in weights.items())  # same base weights
    assert controlnet.controlnet.controlnet_mid_block.weight.abs().sum() > 0  # not zero-initialised
