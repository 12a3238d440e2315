"""latentr3_fast.ops"""
