"""The shapes world: the synthetic benchmark every model family is trained and scored on."""
