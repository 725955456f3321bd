"""The synthetic HOI world: its images (synthetic.py), their captions (captions.py), the small
VLMs pretrained on them (pretrain_vlm.py) and shipped in weights/ (vlms.py), and the recipe the
demo and the ablation share (recipe.py)."""
