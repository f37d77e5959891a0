"""Making a model smaller: checkpoint surgery and what drives it (prune, merge), healing
after it, and distillation into a dense student."""
