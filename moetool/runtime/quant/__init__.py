"""bitsandbytes quantization of experts: the weight class and load paths (bnb.py) and the
quantizer registered with transformers (bnb_quantizer.py)."""
