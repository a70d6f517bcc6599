"""A trained detector in use: `ltm predict` on files (`predict`, with its SLURM-array journal in `journal`),
`ltm export` of one head as ONNX or TorchScript (`export`) and the runner of an exported file (`exported`)."""
