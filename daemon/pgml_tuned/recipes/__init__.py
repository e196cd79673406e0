"""One readable module per task. RECIPES maps pgml.tasks names to modules here; each has run(ctx)."""

RECIPES = {
    "text-classification": "text_classification",
    "text-pair-classification": "text_classification",
    "conversation": "conversation",
    "noop": "noop",
}
