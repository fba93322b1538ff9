from leverplus.errors import LeverPlusInputError


def test_message_names_file_record_field_and_fix():
    err = LeverPlusInputError("pointer has 3 items, expected 2", file="rl.json", record="query 7, candidate 2",
                              field="pointer", fix="pass data.shot_num=3")
    assert str(err) == "rl.json: record query 7, candidate 2: field 'pointer': pointer has 3 items, expected 2. Fix: pass data.shot_num=3"
    assert isinstance(err, ValueError)


def test_message_without_location():
    assert str(LeverPlusInputError("bad")) == "bad"
