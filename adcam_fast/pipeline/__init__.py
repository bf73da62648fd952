"""The main job: labelling a collection, writing the outputs, scoring them."""
