"""latentr3_fast.eval"""
