"""DACT Lab from Python: train an early-exit model on the bundled demo data, then predict (README "Python API").

    .venv/bin/python examples/quickstart.py     # the bundled encoder, a minute or two on a laptop CPU
The run is recorded in the home ($DACT_LAB_HOME, default the project root): the dashboard and `dact-lab runs` show it.
"""
import os

import dact_lib

df = dact_lib.load_demo_dataset().to_frame()  # sentence, class_label, sentiment_label: 405 rows
encoder = os.environ.get("DACT_LAB_EXAMPLE_ENCODER", "all-MiniLM-L6-v2")  # the bundled encoder (tests: "tiny")
run = dact_lib.train(df, kind="dact", encoder=encoder, max_rows=200, epochs=1, progress=True)
print(f"run {run.run_id} ({run.run_dir}): test accuracy {run.metrics['test_accuracy']:.3f}")

model = dact_lib.load(run.run_id)  # what `dact-lab predict --run N` loads
for text in ["the new phone is fantastic", "the match was a dull draw"]:
    answer = model.predict(text)[0]
    print(f"{answer['label']} p={answer['probability']:.2f} exit layer {answer['exit_layer']} <- {text}")
