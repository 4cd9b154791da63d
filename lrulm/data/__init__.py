"""Input pipelines: language-model text and the Long Range Arena tasks."""
