"""The ways of quantizing weights: bitsandbytes int8 / NF4 / FP4 (`bnb`), PyTorch dynamic int8 and half precision
(`dynamic`); each variant built, saved and reloaded (`variants`) from a saved model (`loading`)."""
