"""latentr3_fast.decode"""
