"""Prompt templates used by TaskRes/CoOp-style zero-shot classifiers."""

#: the ImageNet ensemble: CoOp's 7 selected templates plus the plain one (8 templates, as METHODS.md says)
IMAGENET_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of a {}.",
]

#: one template per dataset (CoOp's CUSTOM_TEMPLATES); anything else uses "a photo of a {}."
DATASET_TEMPLATES = {
    "OxfordPets": ["a photo of a {}, a type of pet."],
    "OxfordFlowers": ["a photo of a {}, a type of flower."],
    "FGVCAircraft": ["a photo of a {}, a type of aircraft."],
    "DescribableTextures": ["{} texture."],
    "EuroSAT": ["a centered satellite photo of {}."],
    "StanfordCars": ["a photo of a {}."],
    "Food101": ["a photo of {}, a type of food."],
    "SUN397": ["a photo of a {}."],
    "Caltech101": ["a photo of a {}."],
    "UCF101": ["a photo of a person doing {}."],
    "ImageNet": IMAGENET_TEMPLATES,
}

DEFAULT_TEMPLATES = ["a photo of a {}."]


def templates_for(dataset: str | None) -> list[str]:
    if dataset is None:
        return DEFAULT_TEMPLATES
    return DATASET_TEMPLATES.get(dataset, DEFAULT_TEMPLATES)
