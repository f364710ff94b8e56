"""forgetrt.export"""
