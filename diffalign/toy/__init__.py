"""The embedded toy world: procedural scenes, a pretrained tiny model and a measuring checklist."""
