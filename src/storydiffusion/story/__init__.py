"""The story side: the story format (text boxes and YAML/JSON files), styles and comic pages."""
