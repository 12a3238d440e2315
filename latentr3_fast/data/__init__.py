"""latentr3_fast.data"""
