"""The radiology study's evaluation protocols (SPEC section 8, DINOv2 eval style) on medjax backbones.

- `features`: frozen features extracted once per split (eval transforms) and cached as .npz in a work directory;
- `linear_probe`: the grid of linear heads (n last blocks x avgpool x lr) trained at once on cached features,
  selected on validation by the dataset's target metric, retrained on train + val, tested once;
- `knn`: weighted kNN (cosine, k = 20, T = 0.07) and ML-kNN for multi-label sets;
- `few_shot`: seeded, patient-disjoint k-shot subsets and the linear probe on them;
- `peft` (the CLI's entry; the surgery is `medjax.peft`): LoRA (rank 48, alpha 16, on the family's LoRA targets) and
  BitFit, through the main trainer.

CLI: `python -m medjax.protocols {probe,knn,fewshot,peft} --params DIR --dataset NAME --root DIR --workdir DIR`.
"""

from medjax.protocols import features, few_shot, knn, linear_probe  # noqa: F401 (the submodules)
