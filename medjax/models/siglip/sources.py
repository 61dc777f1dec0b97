"""Official checkpoints of the SigLIP family, by upstream name (read by `medjax.weights` once that registry is in the
tree; nothing imports this module before).

Each is a whole `SiglipModel` file on Hugging Face (`model.safetensors`: the vision tower is converted, the text
tower skipped), converted with the variant of the same shape. Sizes are approximate (the whole model's parameter
count x 4 bytes, MiB); no publisher gives a digest. google/medsiglip-448 is gated: accept the Health AI Developer
Foundations terms on its page, download `model.safetensors`, and give it with `--from-file`.
"""

from medjax.weights.registry import Source, hf

SOURCES = [
    Source("siglip-so400m-patch14-384", "siglip_so400m_patch14_384",
           (hf("google/siglip-so400m-patch14-384", "model.safetensors", 3350),), "Apache-2.0",
           note="transformers google/siglip-so400m-patch14-384 (SiglipModel: vision tower kept)"),
    Source("siglip2-base-patch16-224", "siglip2_base_patch16_224",
           (hf("google/siglip2-base-patch16-224", "model.safetensors", 1430),), "Apache-2.0",
           note="transformers google/siglip2-base-patch16-224 (SigLIP 2 FixRes, SiglipModel: vision tower kept)"),
    Source("siglip2-base-patch16-512", "siglip2_base_patch16_512",
           (hf("google/siglip2-base-patch16-512", "model.safetensors", 1435),), "Apache-2.0",
           note="transformers google/siglip2-base-patch16-512 (SigLIP 2 FixRes, SiglipModel: vision tower kept)"),
    Source("medsiglip-448", "medsiglip_448", (hf("google/medsiglip-448", "model.safetensors", 3350),),
           "health-ai-developer-foundations",
           note="transformers google/medsiglip-448 (gated: accept its terms, download, --from-file)"),
]
