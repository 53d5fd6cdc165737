"""Built-in example stories, shared by `storydiffusion demo` and the web UI."""

# The demo speaks the tiny world's grammar (`storydiffusion.world.render`). Characters are described by
# their kind only, as the tiny model was trained: each character's look (hair, skin, shirt, trousers or
# skirt, hat) is the model's own draw in its reference frames, and CSA carries it to every later panel.
DEMO_CHARACTERS = """\
[Mia] a girl
[Leo] a boy
"""
DEMO_FRAMES = """\
[Mia], walking in the city #Mia walks to the park.
[Mia], jumping in a forest #She jumps over a log.
[Leo], running on a beach #Leo runs by the sea.
[Leo], waving in the snow #Leo waves from the hill.
[Mia], waving, and [Leo], waving, in a room #They meet at home.
[NC] a park at night #Good night.
"""
# The same story for the untrained `tiny-random` model (its panels are noise either way).
RANDOM_DEMO_CHARACTERS = """\
[Mia] a girl with short red hair, yellow raincoat
[Tom] an old man with a grey beard, blue coat
"""
RANDOM_DEMO_FRAMES = """\
[Mia] walks to school in the rain #Mia walks to school.
[Mia] splashes in a puddle #Splash!
[Tom] feeds pigeons in the park #Tom feeds the pigeons.
[Tom] reads a newspaper on a bench #Same bench, every day.
[Mia] and [Tom] share an umbrella #Mia shares her umbrella with Tom.
[NC] the sun comes out over the city #The sun comes out.
"""
