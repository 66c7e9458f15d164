"""Rows -> examples (``formats``) -> text through a template (``templating``) -> token ids and labels (``tokenize``);
an experiment's rows ready to train on (``prepare``); ``fx data``'s report of them (``report``)."""
