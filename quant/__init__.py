"""Quantization (bitsandbytes, dynamic int8, half precision): to come."""
