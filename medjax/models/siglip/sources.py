"""Official checkpoints of the SigLIP family, by upstream name (read by `medjax.weights` once that registry is in the
tree; nothing imports this module before).

Each is a whole `SiglipModel` file on Hugging Face (`model.safetensors`: the vision tower is converted, the text
tower skipped), converted with the variant of the same shape. Sizes are approximate (the whole model's parameter
count x 4 bytes, MiB); no publisher gives a digest. google/medsiglip-448 is gated: accept the Health AI Developer
Foundations terms on its page, download `model.safetensors`, and give it with `--from-file`.
"""

from medjax.weights.registry import hf_source

_KEPT = "SiglipModel: vision tower kept"

SOURCES = [  # google/<name> on Hugging Face, converted with the variant of the same name (`-` read as `_`)
    hf_source(name, name.replace("-", "_"), f"google/{name}", "model.safetensors", mb, licence,
              f"transformers google/{name} ({what})")
    for name, mb, licence, what in (
        ("siglip-so400m-patch14-384", 3350, "Apache-2.0", _KEPT),
        ("siglip2-base-patch16-224", 1430, "Apache-2.0", f"SigLIP 2 FixRes, {_KEPT}"),
        ("siglip2-base-patch16-512", 1435, "Apache-2.0", f"SigLIP 2 FixRes, {_KEPT}"),
        ("medsiglip-448", 3350, "health-ai-developer-foundations", "gated: accept its terms, download, --from-file"))
]
