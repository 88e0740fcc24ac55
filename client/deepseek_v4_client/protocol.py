"""The wire contract of the deepseek_v4 Triton model (the vLLM backend's tensor names)."""
MODEL_NAME = "deepseek_v4"

# input name -> Triton datatype
INPUTS = {
    "text_input": "BYTES",
    "input_ids": "INT32",
    "stream": "BOOL",
    "sampling_parameters": "BYTES",
    "exclude_input_in_output": "BOOL",
}
# output name -> Triton datatype
OUTPUTS = {
    "text_output": "BYTES",
    "output_ids": "INT32",
    "finish_reason": "BYTES",
    "num_input_tokens": "UINT32",
    "num_output_tokens": "UINT32",
}
